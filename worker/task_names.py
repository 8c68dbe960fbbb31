"""Task names and queues: the API publishes by name, so it never imports the worker's tasks."""

VALIDATE_MODEL = "quantserve.models.validate"
VALIDATE_DATASET = "quantserve.datasets.validate"
RUN_JOB = "quantserve.jobs.run"

QUEUE_FOR_DEVICE = {"cpu": "cpu", "cuda": "gpu"}
VALIDATION_QUEUE = "cpu"  # validation reads files on the CPU, whatever device the job will use
DELIVER_WEBHOOK = "quantserve.webhooks.deliver"
# Deliveries share the cpu queue: every worker consumes it, and an attempt is one short HTTP request. Behind
# long jobs on every thread a delivery waits; the sweeper then publishes it again when its lease runs out.
WEBHOOK_QUEUE = "cpu"
