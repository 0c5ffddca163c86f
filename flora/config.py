"""One typed run configuration, validated at load. TOML files in ``configs/``; ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from flora.adapters import ADALORA_INITS, ADAPTER_KINDS, DEFAULT_TARGETS, DROPOUT_SAMPLERS
from flora.lora.methods import METHODS, MethodSpec
from flora.lora.warm import SOURCES, SPLITS

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "8bit", "4bit")
LR_SCHEDULES = ("constant", "cosine", "linear")
REPORT_TO = ("none", "tensorboard", "mlflow")


# Keys whose default changed what a run does, with the value that reproduces runs recorded before the key
# existed. A recorded config (checkpoint, run summary) without such a key is read with this value, not the default.
VALUES_BEFORE_KEY = {"dropout_sampler": "torch"}


class ConfigError(ValueError):
    """A config value that is missing, unknown or out of range; the message names the key."""


@dataclass
class RunConfig:
    # assets
    model: str = "embedded"  # 'embedded' (SmolLM2-135M-Instruct), a HF directory or a .gguf file
    data: str = "embedded"  # 'embedded' (ShareGPT V3) or a JSON/JSONL file / datasets directory
    format: str = "auto"
    max_examples: int = 2000  # seeded sample of the data used (0 = all)
    cutoff: int = 256  # tokens per example
    # federation
    method: str = "flora"
    num_clients: int = 4
    ranks: list[int] = field(default_factory=lambda: [16, 8, 4, 4])  # one per client, or one for all
    rounds: int = 3
    sample_fraction: float = 1.0
    min_clients: int = 1
    weighting: str = "num_examples"  # or 'uniform'
    max_client_weight: float = 0.0  # no client's weight above this; deployment: > 0 lets claimed sizes count (0 = uniform)
    server_lr: float = 1.0  # merging methods: the base weights take server_lr × the aggregate (FedAvg's server step)
    partition: str = "dirichlet"  # iid | dirichlet | quantity
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.05
    max_update_norm: float = 0.0  # reject client updates with ‖B A‖_F above this (0 = no bound)
    clip_update_norm: float = 0.0  # scale each client's whole update down to this norm (0 = off)
    outlier_mad: float = 0.0  # reject updates whose norm's modified z-score (median/MAD) exceeds this (0 = off)
    broadcast: str = "private"  # private (never a client's own factors) | smallest | stacked | refactorized | dense
    error_check: str = "factored"  # aggregation error from the factors (factored) | dense float64 products (dense)
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies (Flower engine)
    min_clients_wait: float = 300.0  # seconds a round waits for min_clients connected nodes, then the run fails
    # warm starts (methods whose clients warm-start, flora-warm; see flora/lora/warm.py)
    warm_source: str = "accumulated"  # G the warm factors are cut from: accumulated (Σ of all merges) | last (merge)
    warm_split: str = "lora"  # lora (A⁰ = Vᵀ/√3, B⁰ = U S √3: a fresh A's scale) | balanced (A⁰ = √S Vᵀ, B⁰ = U √S)
    # client-level differential privacy (flora only; see flora/lora/dp.py)
    dp_noise_multiplier: float = 0.0  # σ: Gaussian noise std in units of dp_clip_norm (0 = DP off)
    dp_clip_norm: float = 0.0  # C: each client's whole-model ‖B_k A_k‖ is clipped to this (required with DP)
    dp_delta: float = 1e-5  # δ at which ε is reported
    dp_broadcast_rank: int = 0  # rank the noisy update is truncated to (0 = Σ of the clients' ranks)
    dp_noise_seed: int = -1  # -1 = noise from the OS's secure random source; >= 0 = reproducible (NOT private)
    # LoRA and local training
    adapters: list[str] = field(default_factory=lambda: ["lora"])  # per client (or one for all): lora | adalora
    adalora_target_ratio: float = 0.5  # AdaLoRA: target average rank = ratio x the client's initial rank
    adalora_warmup: float = 0.1  # AdaLoRA budget schedule: fraction of local steps before pruning starts (tinit)
    adalora_final: float = 0.2  # ... and fraction at the end trained at the final budget (tfinal)
    adalora_init: str = "gaussian"  # AdaLoRA's P, Q at the start: gaussian (peft's std 0.02) | orthonormal
    adalora_lr_ratio: float = 1.0  # AdaLoRA's learning rate of its singular vectors P, Q, as a multiple of lr
    adalora_value_lr_ratio: float = 1.0  # ... and of its singular values Λ
    adalora_orth_weight: float = 0.5  # AdaLoRA's orthogonality regulariser on P and Q (peft's default 0.5)
    alpha_per_rank: float = 2.0  # alpha_k = alpha_per_rank * r_k (the paper's scaling 2 for every rank)
    dropout: float = 0.05
    dropout_sampler: str = "sparse"  # sparse (CPU: draw only the dropped positions, same distribution, faster) | torch
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    local_steps: int = 5
    batch_size: int = 8
    micro_batch_size: int = 4
    lr: float = 3e-4
    lr_schedule: str = "constant"  # constant | cosine | linear, over the whole run (flora/train.py: lr_factor)
    warmup_steps: int = 0  # optimizer steps of linear warm-up at the start of the run (0 = none)
    # hardware (flora/hardware.py)
    device: str = "cpu"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # auto (bfloat16 on a CUDA device that supports it, else float32) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, same losses
    quantize: str = "none"  # none | 8bit | 4bit (bitsandbytes; 4bit = NF4 with double quantization, as QLoRA)
    client_cpus: int = 0  # Flower simulation: CPU cores reserved per client (0 = all cores: one client at a time)
    client_gpus: float = 0.0  # Flower simulation: GPUs per client (fractional: 0.25 = four clients per GPU)
    # evaluation and run
    eval_examples: int = 64  # global test examples scored every round (0 = all)
    client_eval_examples: int = 16  # per client: examples of its own test split scored every round (0 = off)
    server_test_data: str = ""  # the operator's held-out set for test_loss (a file); "" = simulation: the global split, deployment: none
    eval_every: int = 1  # evaluate after every k-th round and always after the last (others: test losses NaN)
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)
    out_dir: str = "runs/latest"
    report_to: str = "none"  # experiment tracking, local files in out_dir: none | tensorboard | mlflow

    def __post_init__(self) -> None:
        self.validate()

    @property
    def spec(self) -> MethodSpec:
        """The method's registry entry (``flora/lora/methods.py``)."""
        return METHODS[self.method]

    @property
    def num_partitions(self) -> int:
        """Training partitions (= clients): a pooled run mode (``centralized``) holds all data in one."""
        return 1 if self.spec.pooled else self.num_clients

    @property
    def dp_enabled(self) -> bool:
        return self.dp_noise_multiplier > 0

    def client_rank(self, client: int) -> int:
        """The (initial) LoRA rank client ``client`` trains at; a pooled run (``centralized``): the largest."""
        if self.spec.pooled:
            return max(self.ranks)
        return self.ranks[0] if len(self.ranks) == 1 else self.ranks[client]

    def client_adapter(self, client: int) -> str:
        return self.adapters[0] if len(self.adapters) == 1 else self.adapters[client]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method = {self.method!r}: expected one of {', '.join(METHODS)}")
        for key in ("num_clients", "rounds", "local_steps", "batch_size", "micro_batch_size", "cutoff", "min_clients",
                    "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} = {getattr(self, key)}: expected an integer >= 1")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError(f"ranks = {self.ranks}: expected ranks >= 1 (one for all, or one per client)")
        if len(self.ranks) not in (1, self.num_clients):
            raise ConfigError(f"ranks = {self.ranks}: expected 1 or num_clients = {self.num_clients} values")
        if self.spec.equal_ranks and len(set(self.ranks)) > 1:
            raise ConfigError(f"method = {self.method!r} needs equal ranks, got ranks = {self.ranks}")
        if not 0 < self.sample_fraction <= 1:
            raise ConfigError(f"sample_fraction = {self.sample_fraction}: expected a value in (0, 1]")
        if self.min_clients > self.num_clients:
            raise ConfigError(f"min_clients = {self.min_clients} exceeds num_clients = {self.num_clients}")
        if self.weighting not in ("num_examples", "uniform"):
            raise ConfigError(f"weighting = {self.weighting!r}: expected 'num_examples' or 'uniform'")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"server_lr = {self.server_lr}: expected a finite step > 0 (1 = the plain aggregate)")
        if self.server_lr != 1 and not self.spec.merges:
            merging = ", ".join(repr(n) for n, s in METHODS.items() if s.merges and s.aggregate is not None)
            raise ConfigError(f"server_lr = {self.server_lr}: a server step applies to methods that merge the "
                              f"aggregate into the base weights ({merging}), got method {self.method!r}")
        if self.server_lr != 1 and self.dp_enabled:
            raise ConfigError(f"server_lr = {self.server_lr}: with differential privacy the noisy aggregate is "
                              f"merged as it is (set server_lr = 1)")
        if not 0 <= self.max_client_weight <= 1:
            raise ConfigError(f"max_client_weight = {self.max_client_weight}: expected a weight in [0, 1] (0 = no cap; "
                              f"a deployment then weights clients uniformly)")
        if self.partition not in ("iid", "dirichlet", "quantity"):
            raise ConfigError(f"partition = {self.partition!r}: expected 'iid', 'dirichlet' or 'quantity'")
        if self.error_check not in ("factored", "dense"):
            raise ConfigError(f"error_check = {self.error_check!r}: expected 'factored' (from the factors, default) or "
                              "'dense' (the float64 reference: every client's product formed)")
        if self.broadcast not in ("private", "smallest", "stacked", "refactorized", "dense"):
            raise ConfigError(f"broadcast = {self.broadcast!r}: expected private, smallest, stacked, refactorized "
                              f"or dense")
        if not self.lr > 0 or not self.alpha_per_rank > 0 or not 0 <= self.dropout < 1:
            raise ConfigError("lr and alpha_per_rank must be > 0 and dropout in [0, 1)")
        if any(a not in ADAPTER_KINDS for a in self.adapters) or len(self.adapters) not in (1, self.num_clients):
            raise ConfigError(f"adapters = {self.adapters}: expected 'lora' / 'adalora', one for all or one per client")
        if any(not ADAPTER_KINDS[a].accepts_init_factors for a in self.adapters) and not self.spec.fresh_adapters:
            fresh = " or ".join(repr(n) for n, s in METHODS.items() if s.fresh_adapters)
            raise ConfigError(f"adapters = {self.adapters}: AdaLoRA clients need method {fresh} "
                              f"(fresh adapters every round), got {self.method!r}")
        if not (0 <= self.adalora_warmup and 0 <= self.adalora_final and self.adalora_warmup + self.adalora_final < 1):
            raise ConfigError(f"adalora_warmup = {self.adalora_warmup}, adalora_final = {self.adalora_final}: "
                              f"expected fractions >= 0 with a sum < 1")
        if self.dropout_sampler not in DROPOUT_SAMPLERS:
            raise ConfigError(f"dropout_sampler = {self.dropout_sampler!r}: expected one of {', '.join(DROPOUT_SAMPLERS)}")
        if self.adalora_init not in ADALORA_INITS:
            raise ConfigError(f"adalora_init = {self.adalora_init!r}: expected one of {', '.join(ADALORA_INITS)}")
        if not (math.isfinite(self.adalora_orth_weight) and self.adalora_orth_weight >= 0):
            raise ConfigError(f"adalora_orth_weight = {self.adalora_orth_weight}: expected a finite weight >= 0")
        for key in ("adalora_lr_ratio", "adalora_value_lr_ratio"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(f"{key} = {getattr(self, key)}: expected a finite multiple of lr > 0")
        if not 0 < self.adalora_target_ratio <= 1:
            raise ConfigError(f"adalora_target_ratio = {self.adalora_target_ratio}: expected a value in (0, 1]")
        for key in ("round_timeout", "min_clients_wait"):
            if not 0 < getattr(self, key) < math.inf:
                raise ConfigError(f"{key} = {getattr(self, key)}: expected a finite number of seconds > 0")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to = {self.report_to!r}: expected one of {', '.join(REPORT_TO)}")
        for key in ("max_update_norm", "clip_update_norm", "outlier_mad", "max_examples", "eval_examples",
                    "client_eval_examples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} = {getattr(self, key)}: expected a value >= 0")
        if not self.targets:
            raise ConfigError("targets: expected at least one module name (e.g. q_proj)")
        self._validate_hardware()
        self._validate_warm()
        self._validate_dp()

    def _validate_hardware(self) -> None:
        """Spelling and ranges only: whether this machine has the device (and bitsandbytes supports it) is
        checked where the model is loaded (``flora/hardware.py``), since a server and its clients may differ."""
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"device = {self.device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype = {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize = {self.quantize!r}: expected one of {', '.join(QUANTIZE)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule = {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps = {self.warmup_steps}: expected an integer >= 0")
        if self.client_cpus < 0 or not 0 <= self.client_gpus < math.inf:
            raise ConfigError(f"client_cpus = {self.client_cpus}, client_gpus = {self.client_gpus}: expected "
                              f"values >= 0 (0 cpus = all cores)")
        if self.client_gpus > 0 and self.device == "cpu":
            raise ConfigError(f"client_gpus = {self.client_gpus} with device = 'cpu': clients would reserve a GPU "
                              f"they do not use; set device = 'cuda' (or 'auto') or client_gpus = 0")
    def _validate_warm(self) -> None:
        if self.warm_source not in SOURCES:
            raise ConfigError(f"warm_source = {self.warm_source!r}: expected one of {', '.join(SOURCES)}")
        if self.warm_split not in SPLITS:
            raise ConfigError(f"warm_split = {self.warm_split!r}: expected one of {', '.join(SPLITS)}")
        screening = [key for key in ("max_update_norm", "clip_update_norm", "outlier_mad") if getattr(self, key)]
        if self.spec.warm_start and screening:
            raise ConfigError(f"{', '.join(screening)}: not implemented for method {self.method!r}, whose clients "
                              f"warm-start: the norm screening sees the uploaded B_k A_k, which holds the warm start, "
                              f"not the client's contribution B_k A_k − B⁰_k A⁰_k")

    def _validate_dp(self) -> None:
        if self.dp_noise_multiplier < 0 or not math.isfinite(self.dp_noise_multiplier):
            raise ConfigError(f"dp_noise_multiplier = {self.dp_noise_multiplier}: expected a finite value >= 0 "
                              f"(0 = differential privacy off)")
        if self.dp_broadcast_rank < 0:
            raise ConfigError(f"dp_broadcast_rank = {self.dp_broadcast_rank}: expected >= 0 (0 = sum of the ranks)")
        if not self.dp_enabled:
            return
        if not self.spec.private:
            private = ", ".join(repr(n) for n, s in METHODS.items() if s.private)
            raise ConfigError(f"dp_noise_multiplier = {self.dp_noise_multiplier}: differential privacy is "
                              f"implemented for method {private}, got {self.method!r}")
        if not self.dp_clip_norm > 0:
            raise ConfigError(f"dp_clip_norm = {self.dp_clip_norm}: differential privacy needs a clip norm > 0 "
                              f"(it bounds each client's influence)")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta = {self.dp_delta}: expected a value in (0, 1), e.g. 1e-5")
        if self.weighting != "uniform":
            raise ConfigError(f"weighting = {self.weighting!r}: with differential privacy clients are weighted "
                              f"uniformly (1 / expected participants); set weighting = 'uniform'")
        if self.outlier_mad:
            raise ConfigError(f"outlier_mad = {self.outlier_mad}: outlier rejection compares clients with each "
                              f"other, which breaks the per-client sensitivity bound of differential privacy; "
                              f"use max_update_norm or dp_clip_norm instead")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def recorded(cls, values: dict) -> dict:
        """A recorded run config (checkpoint, summary) completed with the keys added since it was written: each
        at its value before it existed (``VALUES_BEFORE_KEY``), else at its default (which then kept the
        earlier behaviour)."""
        return {**cls().to_dict(), **VALUES_BEFORE_KEY, **values}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        coerced = {key: _coerce(key, value, hints[key], source) for key, value in values.items()}
        return cls(**coerced)


def _coerce(key: str, value, hint, source: str):
    """Convert ``value`` (TOML value or ``--set`` string) to the field's type, or raise naming the key."""
    origin = typing.get_origin(hint)
    try:
        if origin is list:
            (item,) = typing.get_args(hint)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, list):
                value = [value]
            return [item(v) for v in value]
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} = {value!r}: expected {getattr(hint, '__name__', hint)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (flat keys, or under ``[run]``) and apply ``key=value`` overrides."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML ({exc})") from exc
        values.update(data.get("run", data))
        source = str(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        values[key.strip().replace("-", "_")] = value.strip()
    return RunConfig.from_dict(values, source)


def save_config(config: RunConfig, path: Path) -> None:
    import tomli_w
    path.write_text(tomli_w.dumps({"run": config.to_dict()}))
