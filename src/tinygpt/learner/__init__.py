"""A learner's own model: ``tinygpt check FILE.py[:NAME]`` and ``tinygpt train --model FILE.py:NAME``.

- ``spec``: ``FILE.py:NAME`` parsed, and ``LearnerConfig``, what a run records of such a model;
- ``source``: the file loaded without its script part, the class found and built the lecture's
  way, the recorded model built again (refused if the file is gone or changed);
- ``checks``: the checks, one line each (``check_spec``, ``format_report``);
- ``many``: many files, each checked in its own process with a time limit and a memory cap.

Checking or training a learner's file runs its code as Python would: it is no sandbox.
"""
