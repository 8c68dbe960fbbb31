"""Task names and queues: the API publishes by name, so it never imports the worker's tasks."""

VALIDATE_MODEL = "quantserve.models.validate"
VALIDATE_DATASET = "quantserve.datasets.validate"
RUN_JOB = "quantserve.jobs.run"

QUEUE_FOR_DEVICE = {"cpu": "cpu", "cuda": "gpu"}
VALIDATION_QUEUE = "cpu"  # validation reads files on the CPU, whatever device the job will use
DELIVER_WEBHOOK = "quantserve.webhooks.deliver"
# Deliveries have their own queue: they must not wait behind long jobs, and in compose the workers that run
# hostile files have no way out of their internal network, so a `notifier` that runs no model consumes it
# there. A plain `quantserve worker` (and `serve`) consumes it beside cpu.
WEBHOOK_QUEUE = "webhooks"
