"""The embedded experiment: the CFT paper in miniature on the demo task.

One base model (SFT on partly noisy solutions to problems no arm trains on), then arms
fine-tuned from it with the same schedule and token budget (SFT on correct solutions; CFT
with several flawed-critique fractions; a CFT+SFT mix), each evaluated on the same test
problems: direct-answer accuracy, critique of others' responses, and critique of its own
answers. `runner.run_experiment` is the entry point; one module per job:

  arms.py        arm specs and the pure config derivation of every stage
  base_data.py   the base stage's training set (a problem pool disjoint from the arms')
  evaluation.py  answers, critiques and self-critiques, graded
  stats.py       Wilson intervals, pooling over seeds
  report.py      results table (Markdown + JSON) and plots
  runner.py      stages in order, resume, progress and ETA
"""
