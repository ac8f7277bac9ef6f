"""Applications over the library: the CLI, text pipeline, chat, terminal view, demo and plots."""
