"""The trainer: fine-tuning jobs from the durable consumer ``trainers``, one at a time.

- ``__main__``: ``python -m services.trainer``. ``config``: the strict configuration. ``metrics``: Prometheus.
- ``service``: ``TrainerService``: the take loop, cancel broadcasts, the micro ``status`` endpoint.
- ``execution``: one job: validate, train (resuming from the last checkpoint), publish the result.
- ``pipeline``: the synchronous half of a job, in a worker thread: data, model, loop, result.
- ``loop``: the training loop: optimizer steps, cancel, metrics, checkpoints.
- ``methods``: adaptation methods (LoRA, DoRA, QLoRA, IA3...) as trainable PEFT models.
- ``checkpoint``: what decides the next step, written to and read from a directory.
- ``datasets``, ``dataset_records``, ``dataset_tokens``: where data may come from, record shapes
  to conversations, conversations to token ids and labels.
- ``jobstate``: job state in KV ``llm_train_jobs``. ``events``: a job's events stream.
- ``script_runner``: the seed documents' custom training script, sandboxed and off by default.
"""
