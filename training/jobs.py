"""Every training job, registered: import `create_job` from here, not from training.job.

Importing this module imports the job modules, whose `register_job` decorators fill the
registry in training.job; training.job itself imports no job module, so nothing imports
back up.
"""

from __future__ import annotations

from training import clip_job, network_job  # noqa: F401  (imported for their registrations)
from training.job import create_job, job_kinds

__all__ = ["create_job", "job_kinds"]
