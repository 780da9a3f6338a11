"""The node's configuration: one frozen, typed tree, validated in full at load.

``config/default.yaml`` holds every key with its default and a comment; an
operator's file overrides any subset of it, and command-line flags override
both. Every invalid key is reported at once, each with its dotted path.
Relative weight paths are resolved against the directory of the file that
names them; ``node.data_dir`` and ``node.key`` against the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from node.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "default.yaml"

_FILE_RELATIVE_PATHS = (("encoders", "manifest"),)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


V = TypeVar("V")


def _every_modality(value: dict[str, V]) -> dict[str, V]:
    expected = {"text", "image", "audio", "video"}
    if set(value) != expected:
        raise ValueError(f"must give exactly the modalities {sorted(expected)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSection(_Section):
    data_dir: Path
    key: Path | None = None
    committee: Path | None = None
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value.upper()


class BusSection(_Section):
    url: str
    topic_prefix: str
    client_id: str | None = None
    username: str | None = None
    password: str | None = Field(default=None, validate_default=True)
    consensus_username: str | None = None
    consensus_password: str | None = None
    tls_ca: Path | None = Field(default=None, validate_default=True)
    tls_cert: Path | None = None
    tls_key: Path | None = Field(default=None, validate_default=True)
    keepalive_s: PositiveInt
    connect_timeout_s: PositiveFloat
    reconnect_min_s: PositiveFloat
    reconnect_max_s: PositiveFloat
    publish_window: PositiveInt
    max_inflight: PositiveInt
    receive_window: PositiveInt
    receive_window_mb: PositiveInt

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "mqtts", "embedded"}:
            raise ValueError(
                "must be mqtt://HOST:PORT, mqtts://HOST:PORT (TLS) or embedded://HOST:PORT"
            )
        if not parts.hostname:
            raise ValueError("names no host")
        try:
            parts.port  # noqa: B018 - parsing raises on a bad port
        except ValueError as error:
            raise ValueError(f"bad port: {error}") from None
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if not value or any(char in value for char in "#+") or value.endswith("/"):
            raise ValueError("must be a non-empty topic without wildcards or a trailing /")
        return value

    @field_validator("password")
    @classmethod
    def _password_needs_username(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("username") is None:
            raise ValueError("is set but bus.username is not")
        return value

    @field_validator("tls_ca")
    @classmethod
    def _no_tls_when_embedded(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        url = info.data.get("url")
        if value is not None and url is not None and urlsplit(url).scheme == "embedded":
            raise ValueError(
                "the embedded broker speaks no TLS: use mqtts://HOST:PORT with an external broker"
            )
        return value

    @field_validator("tls_key")
    @classmethod
    def _key_with_certificate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("tls_cert") is None) and "tls_cert" in info.data:
            raise ValueError("bus.tls_cert and bus.tls_key must be given together")
        return value

    @property
    def embedded(self) -> bool:
        return urlsplit(self.url).scheme == "embedded"

    @property
    def tls(self) -> bool:
        """TLS when the URL says mqtts:// or a CA is given."""
        return urlsplit(self.url).scheme == "mqtts" or self.tls_ca is not None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if urlsplit(self.url).scheme == "mqtts" else 1883)


class HttpSection(_Section):
    host: str
    port: Annotated[int, Field(ge=0, le=65535)]
    # The gap explorer (/explore, /api/): off unless asked for.
    explore: bool = False
    explore_sample: PositiveInt = 2000
    explore_paid_rounds: PositiveInt = 10
    whatif_per_minute: PositiveInt = 12
    whatif_burst: PositiveInt = 4


class RoundsSection(_Section):
    genesis_ms: Annotated[int, Field(ge=0)]
    round_seconds: PositiveInt
    epoch_rounds: PositiveInt
    expiry_rounds: PositiveInt
    max_records: PositiveInt
    summary_retention_rounds: PositiveInt


class RateLimitSection(_Section):
    per_minute: PositiveInt
    burst: PositiveInt


class IntakeSection(_Section):
    stale_window_s: PositiveInt
    queue_size: PositiveInt
    queue_mb: PositiveInt
    rate_limit: RateLimitSection


class LimitsSection(_Section):
    message_bytes: PositiveInt
    text_bytes: PositiveInt
    image_bytes: PositiveInt
    image_pixels: PositiveInt
    audio_seconds: PositiveFloat
    video_seconds: PositiveFloat
    video_frames: PositiveInt


class DecodeSection(_Section):
    workers: PositiveInt
    timeout_s: PositiveFloat
    cpu_seconds: PositiveFloat
    memory_mb: PositiveInt


class BatchSection(_Section):
    size: PositiveInt
    wait_ms: Annotated[int, Field(ge=0)]


class AutoscalingSection(_Section):
    min_replicas: PositiveInt
    max_replicas: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


class RaySection(_Section):
    """The encoder pool on Ray Serve (``encoders.backend: ray``)."""

    address: str = "auto"
    app_name: str = "poc-encoders"
    num_replicas: PositiveInt | None = 2
    autoscaling: AutoscalingSection | None = None
    num_cpus: PositiveFloat = 1.0
    num_gpus: Annotated[float, Field(ge=0.0)] = 0.0
    max_batch_size: PositiveInt = 4
    batch_wait_timeout_s: Annotated[float, Field(ge=0.0)] = 0.0
    retries: Annotated[int, Field(ge=0)] = 3
    call_timeout_s: PositiveFloat = 120.0
    start_timeout_s: PositiveFloat = 300.0
    health_interval_s: PositiveFloat = 2.0

    @field_validator("address")
    @classmethod
    def _cluster_address(cls, value: str) -> str:
        if value.startswith("ray://"):
            raise ValueError(
                "Ray Client (ray://) is not supported: give the cluster's GCS address "
                "HOST:PORT, or auto for the cluster this machine belongs to"
            )
        if value != "auto":
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("must be HOST:PORT (the head node's GCS port) or auto")
        return value

    @field_validator("app_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or not all(char.isalnum() or char in "-_" for char in value):
            raise ValueError("must be letters, digits, - and _ (unique per node on a cluster)")
        return value

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> RaySection:
        if (self.num_replicas is None) == (self.autoscaling is None):
            raise ValueError(
                "give num_replicas or autoscaling, not both (set num_replicas: null "
                "to use autoscaling: {min_replicas, max_replicas})"
            )
        return self


class EncodersSection(_Section):
    manifest: Path
    manifest_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    device: str
    workers: Annotated[int, Field(ge=0)] | None = None
    """None: 0 on a cuda device (one process owns the GPU), else 2."""
    threads: Annotated[int, Field(ge=0)]
    batch: dict[str, BatchSection]
    queue_size: PositiveInt
    cache_items: Annotated[int, Field(ge=0)] = 4096
    """Embeddings of recently encoded items kept, so that one sent again is not re-encoded."""
    tau: PositiveFloat
    mask_count: PositiveInt
    backend: Literal["local", "ray"] = "local"
    """local: the node's thread or its worker processes; ray: a Ray Serve pool (``ray``)."""
    ray: RaySection = RaySection()

    @field_validator("batch")
    @classmethod
    def _batch_per_modality(cls, value: dict[str, BatchSection]) -> dict[str, BatchSection]:
        return _every_modality(value)


class FusionSection(_Section):
    alpha: dict[str, Fraction]

    @field_validator("alpha")
    @classmethod
    def _alpha_per_modality(cls, value: dict[str, float]) -> dict[str, float]:
        return _every_modality(value)


class ScoringSection(_Section):
    k: PositiveInt
    threads: Annotated[int, Field(ge=0)] = 1
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the history's exact index lives."""
    index: Literal["auto", "faiss", "torch"] = "auto"
    """auto: faiss on the CPU, torch on a GPU; both answer alike (rewards/history_torch.py)."""
    qualify_ratio: PositiveFloat | None = None
    """None: the manifest's calibrated ratio (the only value a committee should use)."""
    duplicate_radius: dict[str, Annotated[float, Field(ge=0.0, lt=2.0)]] | None = None
    """None: the manifest's calibrated radii; else one per modality."""
    pair_bonus_ppm: PositiveInt
    emission: Annotated[int, Field(ge=0)]
    top_k: PositiveInt

    @model_validator(mode="after")
    def _index_on_its_device(self) -> ScoringSection:
        if self.device == "cuda" and self.index == "faiss":
            raise ValueError("scoring.index faiss runs on the CPU only (faiss-cpu): use torch")
        return self

    @field_validator("duplicate_radius")
    @classmethod
    def _every_radius(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        expected = {"text", "image", "audio", "video"}
        if value is not None and set(value) != expected:
            raise ValueError(f"must give exactly the modalities {sorted(expected)}")
        return value


class ConsensusSection(_Section):
    embedding_tolerance: Annotated[float, Field(ge=0.0, le=2.0)]
    distance_tolerance_ppm: Annotated[int, Field(ge=0)]
    score_tolerance_ppm: Annotated[int, Field(ge=0)]
    propose_timeout_s: PositiveFloat
    prevote_timeout_s: PositiveFloat
    precommit_timeout_s: PositiveFloat
    timeout_delta_s: Annotated[float, Field(ge=0.0)]
    max_timeout_s: PositiveFloat
    rebroadcast_s: PositiveFloat
    sync_timeout_s: PositiveFloat
    sync_reply_bytes: Annotated[int, Field(ge=64 * 1024)]


class Config(_Section):
    node: NodeSection
    bus: BusSection
    http: HttpSection
    rounds: RoundsSection
    intake: IntakeSection
    limits: LimitsSection
    decode: DecodeSection
    encoders: EncodersSection
    fusion: FusionSection
    scoring: ScoringSection
    consensus: ConsensusSection


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = path.resolve().parent
    for section, key in _FILE_RELATIVE_PATHS:
        value = (
            document.get(section, {}).get(key) if isinstance(document.get(section), dict) else None
        )
        if isinstance(value, str) and not Path(value).is_absolute():
            document[section][key] = str((base / value).resolve())
    return document


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"])
        lines.append(f"  {path}: {problem['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``path``, then ``overrides`` (dotted keys), validated in full."""
    document = _read_yaml(DEFAULT_CONFIG)
    if path is not None:
        document = _merge(document, _read_yaml(path))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        document = _merge(document, {section: {key: value}})
    try:
        return Config.model_validate(document)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
