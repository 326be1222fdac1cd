"""The FineTuneJob API, version v1alpha1.

These pydantic models are the single source of truth: the CRD (manifests/crd), the JSON schema for
editors (manifests/schema) and the reference in README.md are generated from them by
`kubetune.api.generate`, and a test fails when a generated file is stale.

Conventions:
- Field names are snake_case in Python and camelCase on the wire (aliases), like every Kubernetes API.
- `None` means "not set"; the description says what an unset field resolves to.
- Cross-field rules are model validators here *and* CEL rules in the CRD (`cel=` in
  `json_schema_extra`), so the API server, `kubetune validate` and the trainer agree.
- Defaults follow the classic Falcon/Guanaco QLoRA recipe (nf4, r=64, alpha=16, dropout 0.1,
  paged_adamw_32bit, max_grad_norm 0.3, warmup 3%, constant LR, group_by_length, gradient
  checkpointing, 500 steps, 512 tokens).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from kubetune.contract import Phase

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# Hugging Face user access tokens. Anything that looks like one, anywhere in a spec, is refused:
# tokens travel only through a Secret (secretKeyRef).
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
HUB_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
K8S_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_RE = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One CRD `x-kubernetes-validations` entry (checked by the API server)."""
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def cel_rules(model: type[BaseModel]) -> list[dict[str, str]]:
    """The CEL rules declared on one model (not its parents or fields)."""
    extra = model.model_config.get("json_schema_extra")
    rules = extra.get("cel") if isinstance(extra, dict) else None
    if not isinstance(rules, list):
        return []
    return [{str(k): str(v) for k, v in r.items()} for r in rules if isinstance(r, dict)]


class _Model(BaseModel):
    """Base: camelCase on the wire, unknown fields are errors, values validated on assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        # Error text must never echo a value back: it could be a token pasted in the wrong field.
        hide_input_in_errors=True,
    )


# --------------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------------


class SecretKeySelector(_Model):
    """A key of a Secret in the FineTuneJob's namespace (the shape of a Pod's `secretKeyRef`)."""

    name: str = Field(pattern=K8S_NAME_RE, max_length=253)
    """Name of the Secret."""
    key: str = Field(default="token", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)
    """Key inside the Secret that holds the value."""


class SecretSource(_Model):
    """Where a secret value comes from. Only a Secret reference is accepted: never the value itself."""

    secret_key_ref: SecretKeySelector
    """The Secret and key that hold the Hugging Face token."""


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


class ModelSource(_Model):
    """The base model: a Hub repository at a pinned revision, or a path inside the container."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "has(self.id) != has(self.path)",
                    "set exactly one of model.id (a Hub repository) or model.path (a local folder)",
                )
            ]
        }
    )

    id: str | None = Field(default=None, pattern=HUB_ID_RE, max_length=200)
    """Hub repository id, e.g. `meta-llama/Llama-2-7b-hf`."""
    revision: str = Field(default="main", min_length=1, max_length=200)
    """Hub revision (branch, tag or commit) of `id`. Pin a commit for reproducible runs."""
    path: str | None = Field(default=None, min_length=1)
    """A local folder (or a folder on a mounted volume) holding the model, instead of `id`."""
    trust_remote_code: bool = False
    """Run Python code shipped in the model repository. Off by default: it runs unreviewed code."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.id is None) == (self.path is None):
            raise ValueError("set exactly one of model.id (a Hub repository) or model.path (a local folder)")
        return self


DatasetFormat = Literal["text", "alpaca", "chat"]


class ValidationSplit(_Model):
    """Held-out data for evaluation: a named split of the dataset, or a fraction of the training rows."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "has(self.split) != has(self.fraction)",
                    "set exactly one of validation.split or validation.fraction",
                )
            ]
        }
    )

    split: str | None = Field(default=None, min_length=1)
    """Name of a split of the Hub dataset, e.g. `test`."""
    fraction: float | None = Field(default=None, gt=0, lt=1)
    """Fraction of the cleaned training rows held out for evaluation, e.g. `0.05`."""

    @model_validator(mode="after")
    def _one_of(self) -> ValidationSplit:
        if (self.split is None) == (self.fraction is None):
            raise ValueError("set exactly one of validation.split or validation.fraction")
        return self


class DatasetSource(_Model):
    """The training data: a Hub dataset at a pinned revision, or local jsonl/csv/parquet files."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "has(self.id) != has(self.files)",
                    "set exactly one of dataset.id (a Hub dataset) or dataset.files (local files)",
                ),
                cel(
                    "!has(self.validation) || !has(self.validation.split) || has(self.id)",
                    "validation.split needs a Hub dataset (dataset.id); use validation.fraction "
                    "with local files",
                ),
            ]
        }
    )

    id: str | None = Field(default=None, pattern=HUB_ID_RE, max_length=200)
    """Hub dataset id, e.g. `timdettmers/openassistant-guanaco`."""
    revision: str = Field(default="main", min_length=1, max_length=200)
    """Hub revision (branch, tag or commit) of `id`."""
    split: str = Field(default="train", min_length=1)
    """Split of the Hub dataset to train on."""
    files: list[str] | None = Field(default=None, min_length=1)
    """Local data files, all of one type: `.jsonl`/`.json`, `.csv` or `.parquet`."""
    format: DatasetFormat = "text"
    """How rows become training text. `text`: one column of ready text (`textField`).
    `alpaca`: `instruction`/`input`/`output` columns in the Alpaca prompt.
    `chat`: a list of `{role, content}` messages (`messagesField`) rendered with the tokenizer's
    chat template."""
    text_field: str = Field(default="text", min_length=1)
    """Column with the training text, for `format: text`."""
    messages_field: str = Field(default="messages", min_length=1)
    """Column with the chat messages, for `format: chat`."""
    validation: ValidationSplit | None = None
    """Evaluation data. Unset: no evaluation."""
    dedup: bool = True
    """Drop exact duplicate rows (after dropping empty ones) before training."""

    @field_validator("files")
    @classmethod
    def _one_file_type(cls, files: list[str] | None) -> list[str] | None:
        if files is None:
            return None
        kinds = set()
        for f in files:
            kind = _file_kind(f)
            if kind is None:
                raise ValueError(f"{f!r}: unsupported file type; use .jsonl, .json, .csv or .parquet")
            kinds.add(kind)
        if len(kinds) > 1:
            raise ValueError(f"files mix types {sorted(kinds)}; use files of one type")
        return files

    @model_validator(mode="after")
    def _rules(self) -> DatasetSource:
        if (self.id is None) == (self.files is None):
            raise ValueError("set exactly one of dataset.id (a Hub dataset) or dataset.files (local files)")
        if self.validation is not None and self.validation.split is not None and self.id is None:
            raise ValueError(
                "validation.split needs a Hub dataset (dataset.id); use validation.fraction with local files"
            )
        return self


def _file_kind(path: str) -> str | None:
    lower = path.lower()
    for suffix, kind in ((".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".parquet", "parquet")):
        if lower.endswith(suffix):
            return kind
    return None


# --------------------------------------------------------------------------------------------------
# Method: LoRA / QLoRA / full
# --------------------------------------------------------------------------------------------------


class LoraSpec(_Model):
    """LoRA adapter settings (PEFT)."""

    r: int = Field(default=64, ge=1, le=1024)
    """Rank of the update matrices."""
    alpha: int = Field(default=16, ge=1)
    """Scaling numerator: the update is scaled by `alpha / r`."""
    dropout: float = Field(default=0.1, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = Field(default=None, min_length=1)
    """Module names to adapt. Unset: chosen per architecture (Llama: q/k/v/o/gate/up/down projections;
    Falcon and BLOOM: query_key_value, dense, dense_h_to_4h, dense_4h_to_h). `[all-linear]` adapts
    every linear layer but the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""


class QuantizationSpec(_Model):
    """Load the frozen base weights quantized through bitsandbytes."""

    bits: Literal[4, 8] = 4
    """4 (QLoRA) or 8. One value, so 4- and 8-bit can never be asked for together."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit per weight)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Data type of the 4-bit matmuls. `float32` on CPUs without bf16."""


class MethodSpec(_Model):
    """How the model is tuned."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    # type and bits default to qlora and 4, and CEL sees only what was written.
                    "(has(self.type) && self.type != 'qlora') || !has(self.quantization) "
                    "|| !has(self.quantization.bits) || self.quantization.bits == 4",
                    "qlora needs 4-bit quantization: set method.quantization.bits to 4, or use "
                    "method.type lora",
                ),
                cel(
                    "!has(self.type) || self.type != 'full' || (!has(self.quantization) && !has(self.lora))",
                    "full fine-tuning trains every weight: remove method.quantization and method.lora, "
                    "or use method.type qlora/lora",
                ),
            ]
        }
    )

    type: Literal["qlora", "lora", "full"] = "qlora"
    """`qlora`: 4-bit base + LoRA. `lora`: LoRA on a bf16/fp16 base (optionally 8-bit).
    `full`: every weight is trained, no adapter."""
    lora: LoraSpec | None = None
    """Adapter settings, for `qlora` and `lora`. Unset: the recipe defaults."""
    quantization: QuantizationSpec | None = None
    """Base-weight quantization. Unset: 4-bit nf4 for `qlora`, none otherwise."""

    @model_validator(mode="after")
    def _rules(self) -> MethodSpec:
        q = self.quantization
        if self.type == "qlora" and q is not None and q.bits != 4:
            raise ValueError(
                "qlora needs 4-bit quantization: set method.quantization.bits to 4, or use method.type lora"
            )
        if self.type == "full" and (q is not None or self.lora is not None):
            raise ValueError(
                "full fine-tuning trains every weight and 4/8-bit weights need an adapter: remove "
                "method.quantization and method.lora, or use method.type qlora/lora"
            )
        return self

    @property
    def uses_adapter(self) -> bool:
        return self.type != "full"

    def effective_lora(self) -> LoraSpec | None:
        if not self.uses_adapter:
            return None
        return self.lora or LoraSpec()

    def effective_quantization(self) -> QuantizationSpec | None:
        if self.quantization is not None:
            return self.quantization
        return QuantizationSpec() if self.type == "qlora" else None


# --------------------------------------------------------------------------------------------------
# Training hyper-parameters
# --------------------------------------------------------------------------------------------------

Optimizer = Literal[
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adafactor",
    "sgd",
]
Scheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]

DEFAULT_MAX_STEPS = 500


class TrainingSpec(_Model):
    """Optimisation hyper-parameters (passed to TRL's SFTTrainer)."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "!(has(self.epochs) && has(self.maxSteps))",
                    "set training.epochs or training.maxSteps, not both",
                ),
                cel(
                    "!has(self.blockSize) "
                    "|| self.blockSize <= (has(self.maxSeqLength) ? self.maxSeqLength : 512)",
                    "training.blockSize cannot exceed training.maxSeqLength",
                ),
                cel(
                    "!has(self.earlyStoppingPatience) || !has(self.saveSteps) || !has(self.evalSteps) "
                    "|| self.saveSteps % self.evalSteps == 0",
                    "early stopping keeps the best checkpoint, so training.saveSteps must be a multiple "
                    "of training.evalSteps",
                ),
            ]
        }
    )

    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate."""
    epochs: float | None = Field(default=None, gt=0)
    """Passes over the training data. Set this or `maxSteps`."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps. Unset and no `epochs`: 500 (the Guanaco recipe)."""
    per_device_batch_size: int = Field(default=4, ge=1)
    """Sequences per GPU per forward pass."""
    gradient_accumulation_steps: int = Field(default=4, ge=1)
    """Forward passes per optimizer step. Global batch = batch size x accumulation x GPUs."""
    max_seq_length: int = Field(default=512, ge=16, le=131072)
    """Longest tokenized sequence; longer rows are truncated."""
    packing: bool = False
    """Pack several short rows into one sequence of `blockSize` tokens (less padding, faster)."""
    block_size: int | None = Field(default=None, ge=16, le=131072)
    """Length of the packed blocks (AutoTrain's `block_size`). Setting it turns `packing` on; rows
    are first truncated to `maxSeqLength` (AutoTrain's `model_max_length`). Unset: `maxSeqLength`."""
    optimizer: Optimizer = "paged_adamw_32bit"
    """Optimizer. `paged_*` optimizers page their state to CPU memory under pressure."""
    lr_scheduler: Scheduler = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up."""
    max_grad_norm: float = Field(default=0.3, gt=0)
    """Gradient clipping threshold."""
    weight_decay: float = Field(default=0.001, ge=0)
    """Decoupled weight decay."""
    group_by_length: bool = True
    """Batch rows of similar length together (less padding, faster)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """`auto`: bf16 on GPUs that support it, else fp16 on GPU, none on CPU."""
    upcast_norms: bool = True
    """Keep normalization layers in float32 (as in the QLoRA recipe) for stable training."""
    seed: int = Field(default=42, ge=0)
    """Random seed for data order, dropout and initialisation."""
    logging_steps: int = Field(default=10, ge=1)
    """Log loss and learning rate every N steps."""
    save_steps: int | None = Field(default=None, ge=1)
    """Checkpoint every N steps (resume after preemption restarts from the last one). Unset: 10 x
    `loggingSteps`, at most 100."""
    save_total_limit: int = Field(default=2, ge=1)
    """Checkpoints kept on disk."""
    eval_steps: int | None = Field(default=None, ge=1)
    """Evaluate every N steps. Unset: at each checkpoint."""
    early_stopping_patience: int | None = Field(default=None, ge=1)
    """Stop when the validation loss has not improved for N evaluations. Needs `dataset.validation`."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Multi-GPU strategy through accelerate: `ddp` replicates the model, `fsdp` shards it."""

    @model_validator(mode="after")
    def _rules(self) -> TrainingSpec:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set training.epochs or training.maxSteps, not both")
        if self.block_size is not None and self.block_size > self.max_seq_length:
            raise ValueError("training.blockSize cannot exceed training.maxSeqLength")
        if (
            self.early_stopping_patience is not None
            and self.save_steps is not None
            and self.eval_steps is not None
            and self.save_steps % self.eval_steps
        ):
            raise ValueError(
                "early stopping keeps the best checkpoint, so training.saveSteps must be a multiple of "
                "training.evalSteps"
            )
        return self

    def effective_max_steps(self) -> int:
        """-1 means "run `epochs` epochs" (the transformers convention)."""
        if self.max_steps is not None:
            return self.max_steps
        return -1 if self.epochs is not None else DEFAULT_MAX_STEPS

    @property
    def uses_packing(self) -> bool:
        return self.packing or self.block_size is not None

    def effective_block_size(self) -> int:
        """Tokens per training sequence (per packed block when packing)."""
        return self.block_size or self.max_seq_length

    def effective_save_steps(self) -> int:
        return self.save_steps or min(100, 10 * self.logging_steps)

    def effective_eval_steps(self) -> int:
        return self.eval_steps or self.effective_save_steps()


# --------------------------------------------------------------------------------------------------
# Resources and scheduling
# --------------------------------------------------------------------------------------------------


class Toleration(_Model):
    """A Pod toleration (same fields as core/v1 Toleration)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


Quantity = str  # Kubernetes resource quantity, e.g. "8", "500m", "64Gi"


class ResourcesSpec(_Model):
    """Compute for each trainer Pod (one Pod per node)."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "!has(self.gpuType) || !has(self.gpusPerNode) || self.gpusPerNode > 0",
                    "resources.gpuType needs GPUs: set resources.gpusPerNode to 1 or more",
                ),
                cel(
                    "!has(self.nodes) || self.nodes == 1 || !has(self.gpusPerNode) || self.gpusPerNode > 0",
                    "multi-node runs need GPUs: set resources.gpusPerNode to 1 or more, "
                    "or resources.nodes to 1",
                ),
            ]
        }
    )

    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """`nvidia.com/gpu` requested by each Pod; one training process per GPU. 0 trains on CPU."""
    nodes: int = Field(default=1, ge=1, le=128)
    """Pods (nodes) in the run. More than one runs multi-node through an Indexed Job."""
    gpu_type: str | None = Field(default=None, min_length=1, max_length=63)
    """Required GPU product, matched against the node label `nvidia.com/gpu.product`
    (e.g. `NVIDIA-A100-SXM4-80GB`)."""
    cpu: Quantity | None = Field(default=None, pattern=QUANTITY_RE)
    """CPU request (and limit) per Pod, e.g. `"8"`."""
    memory: Quantity | None = Field(default=None, pattern=QUANTITY_RE)
    """Memory request (and limit) per Pod, e.g. `64Gi`."""
    shared_memory: Quantity = Field(default="8Gi", pattern=QUANTITY_RE)
    """Size of `/dev/shm` (data loader workers and NCCL need more than the container default)."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Extra tolerations. The `nvidia.com/gpu` taint is always tolerated when GPUs are requested."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Extra node labels the Pods must land on."""
    priority_class_name: str | None = Field(default=None, pattern=K8S_NAME_RE)
    """PriorityClass of the Pods."""

    @model_validator(mode="after")
    def _rules(self) -> ResourcesSpec:
        if self.gpu_type is not None and self.gpus_per_node == 0:
            raise ValueError("resources.gpuType needs GPUs: set resources.gpusPerNode to 1 or more")
        if self.nodes > 1 and self.gpus_per_node == 0:
            raise ValueError(
                "multi-node runs need GPUs: set resources.gpusPerNode to 1 or more, or resources.nodes to 1"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Output, samples, run policy
# --------------------------------------------------------------------------------------------------


class HubOutput(_Model):
    """Push the result to a Hugging Face Hub repository."""

    repo_id: str = Field(pattern=HUB_ID_RE, max_length=200)
    """Target repository, e.g. `my-org/falcon-7b-guanaco`. Created when missing."""
    private: bool = True
    """Create the repository as private."""
    revision: str = Field(default="main", min_length=1, max_length=200)
    """Branch to push to (created when missing)."""
    token: SecretSource
    """The Hugging Face token with write access, only as a Secret reference. It is also used to
    download gated base models and datasets."""

    @field_validator("token", mode="before")
    @classmethod
    def _token_is_a_reference(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                "a token cannot be written inline; store it in a Secret and set "
                "token.secretKeyRef: {name: <secret>, key: <key>}"
            )
        return value


class OutputSpec(_Model):
    """Where the result goes. The adapter, tokenizer (with chat template), model card, metrics and
    samples are always written to `path`; `hub` also pushes them."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "!has(self.pushMerged) || !self.pushMerged || has(self.hub)",
                    "output.pushMerged needs output.hub",
                ),
            ]
        }
    )

    path: str = Field(default="/workspace/output", min_length=1)
    """Output folder inside the trainer container, on the workspace volume by default (a relative
    path starts at `storage.mountPath`). Each run writes into a folder of its own,
    `<path>/runs/<run name>` (`status.outputPath`), checkpoints included."""
    hub: HubOutput | None = None
    """Also push to the Hub."""
    push_adapter: bool = True
    """Push the LoRA adapter (ignored for `method.type: full`, which pushes the full model)."""
    push_merged: bool = False
    """Also merge the adapter into the (unquantized) base weights and push the merged model, under
    `merged/` in the same repository."""

    @model_validator(mode="after")
    def _rules(self) -> OutputSpec:
        if self.push_merged and self.hub is None:
            raise ValueError("output.pushMerged needs output.hub")
        return self


class SamplesSpec(_Model):
    """Text generated by the tuned model after training, saved with the results and the model card."""

    prompts: list[str] = Field(default_factory=list, max_length=32)
    """Prompts to complete. Empty: no samples."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    top_k: int = Field(default=50, ge=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    temperature: float = Field(default=1.0, gt=0)


DEFAULT_STORAGE_SIZE = "50Gi"


class StorageSpec(_Model):
    """The workspace volume, mounted at `mountPath` in every trainer Pod. It holds the model and
    data caches (`HF_HOME`), checkpoints and each run's output folder, so a replaced Pod resumes
    from its last checkpoint without downloading anything again. By default kubetune creates a
    PersistentVolumeClaim `<name>-workspace` for the FineTuneJob (ReadWriteOnce; ReadWriteMany when
    `resources.nodes` > 1)."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "!has(self.claimName) || !has(self.ephemeral) || !self.ephemeral",
                    "set storage.claimName (an existing claim) or storage.ephemeral (an emptyDir), not both",
                ),
                cel(
                    "(!has(self.claimName) && (!has(self.ephemeral) || !self.ephemeral)) "
                    f"|| ((!has(self.size) || self.size == '{DEFAULT_STORAGE_SIZE}') "
                    "&& !has(self.storageClassName))",
                    "set storage.size and storage.storageClassName (the claim kubetune creates) or "
                    "storage.claimName / storage.ephemeral, not both",
                ),
            ]
        }
    )

    claim_name: str | None = Field(default=None, pattern=K8S_NAME_RE, max_length=253)
    """An existing PersistentVolumeClaim to mount instead of the one kubetune creates; kubetune
    creates nothing and never deletes it."""
    mount_path: str = Field(default="/workspace", pattern=r"^/")
    """Where the volume is mounted."""
    size: Quantity = Field(default=DEFAULT_STORAGE_SIZE, pattern=QUANTITY_RE)
    """Size of the claim kubetune creates: room for the base model, the data, checkpoints and
    outputs."""
    storage_class_name: str | None = Field(default=None, pattern=K8S_NAME_RE, max_length=253)
    """StorageClass of the claim kubetune creates. Unset: the cluster's default StorageClass."""
    ephemeral: bool = False
    """An emptyDir instead of a claim: nothing is kept, and a replaced Pod (after a preemption)
    starts from scratch and downloads everything again."""
    reclaim_policy: Literal["Delete", "Retain"] = "Delete"
    """What happens to the claim kubetune creates when the FineTuneJob is deleted. `Delete`: it is
    owned by the FineTuneJob and deleted with it. `Retain`: it is kept (no owner reference), and a
    FineTuneJob of the same name uses it again."""

    @model_validator(mode="after")
    def _rules(self) -> StorageSpec:
        if self.claim_name is not None and self.ephemeral:
            raise ValueError(
                "set storage.claimName (an existing claim) or storage.ephemeral (an emptyDir), not both"
            )
        if (self.claim_name is not None or self.ephemeral) and (
            self.size != DEFAULT_STORAGE_SIZE or self.storage_class_name is not None
        ):
            raise ValueError(
                "set storage.size and storage.storageClassName (the claim kubetune creates) or "
                "storage.claimName / storage.ephemeral, not both"
            )
        return self

    @property
    def creates_claim(self) -> bool:
        """kubetune creates (and owns, unless Retain) the workspace claim."""
        return self.claim_name is None and not self.ephemeral


class RunPolicy(_Model):
    """Job-level policy, with batch/v1 Job names."""

    suspend: bool = False
    """Pause the run (the Job's Pods are deleted; the run continues from its last checkpoint when
    resumed). Ignored with `queueName`: Kueue then owns the Job's `suspend`."""
    backoff_limit: int = Field(default=3, ge=0)
    """Pod failures before the run is Failed. Preemptions (`DisruptionTarget`) do not count."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Wall-clock limit of the run."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the finished Job after this long (the FineTuneJob and its status stay)."""
    queue_name: str | None = Field(default=None, pattern=K8S_NAME_RE)
    """Kueue LocalQueue. The Job is created suspended, with the queue label, and Kueue admits it
    (state `Queued` until then)."""


class PodMetadata(_Model):
    """Extra labels and annotations for the trainer Pods (e.g. `cluster-autoscaler.kubernetes.io/
    safe-to-evict: "false"`, or a service mesh opt-out). kubetune's own labels win on a clash."""

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJobSpec(_Model):
    """Desired state of a FineTuneJob."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "!has(self.training) || !has(self.training.earlyStoppingPatience) "
                    "|| has(self.dataset.validation)",
                    "training.earlyStoppingPatience needs evaluation data: set dataset.validation",
                ),
            ]
        }
    )

    model: ModelSource
    """The base model."""
    dataset: DatasetSource
    """The training data."""
    method: MethodSpec = Field(default_factory=MethodSpec)
    """QLoRA (default), LoRA or full fine-tuning."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Hyper-parameters."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """GPUs, nodes and scheduling."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """The working volume (checkpoints, caches, output)."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the result goes."""
    samples: SamplesSpec = Field(default_factory=SamplesSpec)
    """Generations recorded after training."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Suspend, retries, deadlines, clean-up, queueing."""
    image: str | None = Field(default=None, min_length=1)
    """Trainer image. Unset: the image matching the operator's version."""
    pod_metadata: PodMetadata = Field(default_factory=PodMetadata)
    """Extra labels and annotations for the trainer Pods."""

    @model_validator(mode="after")
    def _rules(self) -> FineTuneJobSpec:
        if self.training.early_stopping_patience is not None and self.dataset.validation is None:
            raise ValueError("training.earlyStoppingPatience needs evaluation data: set dataset.validation")
        return self


# --------------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------------

State = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]


class Condition(_Model):
    """A standard Kubernetes condition."""

    model_config = ConfigDict(extra="allow")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    observed_generation: int | None = None


class FineTuneJobStatus(_Model):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="allow")

    state: State | None = None
    """Pending, Queued (Kueue holds the Job), Running, Suspended, Succeeded or Failed."""
    phase: Phase | None = None
    """What the trainer is doing, as it last reported: Loading, Training, Evaluating, Saving,
    Pushing, Succeeded, Failed or Preempted."""
    reason: str | None = None
    """The reason of the condition that explains the state, e.g. `Unschedulable`, `SecretMissing`,
    `OOMKilled`, `Preempted`."""
    progress: str | None = None
    """Training progress, e.g. `37%`."""
    loss: str | None = None
    """Latest training loss."""
    eta: str | None = None
    """Estimated time left, e.g. `1h12m`."""
    step: int | None = None
    total_steps: int | None = None
    restarts: int | None = None
    """Trainer Pods restarted (preemptions and failures); each one resumes from the last checkpoint."""
    preemptions: int | None = None
    """Of the restarts, those after a preemption or eviction (not failures: they use up no retries)."""
    job_name: str | None = None
    """The batch/v1 Job of the current run."""
    spec_hash: str | None = None
    """Hash of the spec the current run was started from."""
    workspace_claim: str | None = None
    """The PersistentVolumeClaim mounted as the workspace (none with `storage.ephemeral`)."""
    output_path: str | None = None
    """Where the current run writes its results: `<output.path>/runs/<run name>`."""
    observed_generation: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The resource
# --------------------------------------------------------------------------------------------------


class ObjectMeta(_Model):
    """The parts of metadata kubetune reads; the rest is kept as it is."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=K8S_NAME_RE, max_length=63)
    namespace: str | None = Field(default=None, pattern=K8S_NAME_RE, max_length=63)
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(_Model):
    """Fine-tune a causal language model (QLoRA, LoRA or full) and publish the result."""

    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(
                    "size(self.metadata.name) <= 63",
                    "metadata.name must be at most 63 characters: it names and labels the trainer Job",
                )
            ]
        }
    )

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_tokens(cls, data: Any) -> Any:
        leaked = find_inline_tokens(data)
        if leaked:
            # Checked before anything else, and the message names where, never what.
            raise ValueError(
                "inline Hugging Face token at "
                + ", ".join(".".join(map(str, loc)) for loc in leaked)
                + ": "
                + INLINE_TOKEN_FIX
            )
        return data


INLINE_TOKEN_FIX = (
    "never put a token in a spec; store it in a Secret and reference it with "
    "spec.output.hub.token.secretKeyRef"
)


def find_inline_tokens(data: Any, loc: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The location of every string that looks like a Hugging Face token."""
    found: list[tuple[str | int, ...]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += find_inline_tokens(v, (*loc, str(k)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += find_inline_tokens(v, (*loc, i))
    elif isinstance(data, str) and HF_TOKEN_RE.search(data):
        found.append(loc)
    return found
