"""The fine-tuning surface of the edge (scope ``training``).

- ``routes``: ``add_routes(app)``, the routes of this folder and their ``TrainingStore``.
- ``types``: the request bodies accepted.
- ``translate``: request bodies to ``schemas.training.TrainingJob``. Pure.
- ``files``: OpenAI's Files API (``/v1/files``) for training data.
- ``fine_tuning``: OpenAI's ``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, events, checkpoints.
- ``native``: the native ``/api/v1/training/*`` API.
- ``jobs``: starting a job, shared by both APIs.
- ``bodies``: job, event, checkpoint and file objects as OpenAI and native bodies.
- ``store``: the bus access: uploaded files, job state, submission, cancel, events.
"""
