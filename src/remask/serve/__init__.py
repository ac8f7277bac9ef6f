"""An OpenAI-compatible server (FastAPI, the `serve` extra) with step-level batching, and the page that shows the denoising live."""
