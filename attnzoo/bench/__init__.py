"""The benchmark harness: synthetic tasks, tiny models, training, speed sweeps, a results store, a report.

- :mod:`attnzoo.bench.tasks`: ``mqar`` (Zoology), ``induction``, ``selective_copy``,
  ``icl_linear_regression``, LRA ``listops``, ``gcog`` (:mod:`attnzoo.bench.gcog`), the bag tasks ``mil_bags``
  and ``set_maximum`` (:mod:`attnzoo.bench.pooling_tasks`); seeded, generated offline.
- :mod:`attnzoo.bench.cab`: the CAB contract (declared {causal, non-causal} x {self, cross}).
- :mod:`attnzoo.bench.models`: a tiny language model and an encoder classifier around any mixer, a bag
  classifier around any pooler and a small CNN around any channel module.
- :mod:`attnzoo.bench.train`: AdamW + cosine, Zoology's evaluation rule, early stop, DDP.
- :mod:`attnzoo.bench.speed`: forward / forward+backward time, peak memory and FLOPs vs SDPA dense.
- :mod:`attnzoo.bench.store`: the SQLite results store. :mod:`attnzoo.bench.report`: HTML + PNG.
- :mod:`attnzoo.bench.compare`: ``attnzoo compare`` (train, measure, store, report).
"""

from attnzoo.bench.tasks import TASKS, Task, TaskData, get_task  # noqa: I001  (tasks before cab)
from attnzoo.bench import cab  # noqa: F401  (registers the ``cab`` task entry)
from attnzoo.bench import gcog  # noqa: F401  (registers the ``gcog`` task entry and adds it to TASKS)
from attnzoo.bench import pooling_tasks  # noqa: F401  (registers ``mil_bags`` and ``set_maximum``, adds them to TASKS)

__all__ = ["TASKS", "Task", "TaskData", "get_task"]
