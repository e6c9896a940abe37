"""What the tests share, by purpose: ``models`` (tiny models, fixed batches, logits), ``cases`` (the case matrix
every generic test runs over, read from the method registry), ``training`` (a plain loop, the Trainer's toy
task, saved activations), ``engine`` (random adapters and greedy references for the engine tests),
``processes`` (``ftserve serve`` in a subprocess), ``answer_models`` (models whose greedy answer is known) and
``files`` (folder digests).

Everything is deterministic: every random draw goes through a seeded ``torch.Generator``, a seed the test sets,
or ``ftserve.testing``'s seeded builders.
"""
