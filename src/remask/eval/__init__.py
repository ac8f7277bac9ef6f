"""Evaluation: log-likelihoods (`scoring`), perplexity on held-out text, multiple-choice tasks,
the lm-evaluation-harness model (`harness`, optional extra) and the reversal-curse benchmark."""
