"""Evaluation: continuation log-likelihoods, MMLU (cloze and letter), MT-bench answers and judging."""
