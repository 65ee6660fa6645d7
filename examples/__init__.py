"""Runnable examples, from the repository root (each starts a local server unless HPCAI_BASE_URL is set):

python -m examples.quickstart   the HPC-AI TrainingClient walkthrough, synchronous
python -m examples.sft          asynchronous supervised fine-tuning on made-up facts (examples/data)
python -m examples.grpo         asynchronous GRPO on small-number addition
python -m examples.resume       save with the optimizer, resume in a new client, compare the curves
python -m examples.demo         all of it on one local server, ending with the curves (make demo)
"""
