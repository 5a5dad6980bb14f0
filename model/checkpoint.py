"""Reading Hugging Face safetensors checkpoints: whole models or a chosen subset of tensors.

Only safetensors are read (never pickles). Sharded checkpoints are found through
``model.safetensors.index.json``; a folder of ``*.safetensors`` without an index works too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import kernels
from model.config import ModelArgs

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the tensor or file and the fix."""


class CheckpointReader:
    """Maps tensor names to safetensors files and reads any subset of them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            for file in set(weight_map.values()):
                if not (self.path / file).exists():
                    raise CheckpointError(f"{index} lists {file}, which is missing from {self.path}")
            return weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(
                    f"{self.path} holds only {', '.join(pickles)}: raymoe reads safetensors only and never "
                    "unpickles a checkpoint; convert it to *.safetensors first"
                )
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        weight_map = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    weight_map[name] = file.name
        return weight_map

    @property
    def args(self) -> ModelArgs:
        return ModelArgs.from_hf(self.path)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: Iterable[str], device: str | torch.device = "cpu", progress: bool = False,
             desc: str = "loading") -> dict[str, torch.Tensor]:
        """Read ``names`` (each file opened once); a missing name raises ``CheckpointError``."""
        by_file: dict[str, list[str]] = defaultdict(list)
        names = list(names)
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(
                    f"tensor {name!r} is missing from the checkpoint {self.path}; "
                    "the config.json and the weights do not match"
                )
            by_file[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        bar = tqdm(total=len(names), desc=desc, unit="tensor", disable=not progress, leave=False)
        for file, file_names in by_file.items():
            with safe_open(self.path / file, framework="pt", device=str(device)) as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
                    bar.update()
        bar.close()
        return out


def load_into(module: torch.nn.Module, reader: CheckpointReader, prefix: str = "",
              progress: bool = True, desc: str = "loading weights") -> None:
    """Fill every parameter of ``module`` from the checkpoint tensor of the same name (after
    ``prefix``). Shapes must match exactly; float tensors are cast to the parameter's dtype."""
    params = dict(module.named_parameters())
    for n in params:
        if n.endswith("weight_scale_inv") and prefix + n not in reader:
            weight = prefix + n[: -len("_scale_inv")]
            raise CheckpointError(
                f"config.json has an FP8 quantization_config but {weight!r} has no {weight + '_scale_inv'!r}; "
                "remove quantization_config from config.json or use the FP8 weights"
            )
    names = [prefix + n for n in params]
    # FP8 weights loaded into a float model (dequantised at load): read their scales too
    names += [n + "_scale_inv" for n in names if n + "_scale_inv" in reader and n + "_scale_inv" not in names]
    tensors = reader.read(names, progress=progress, desc=desc)
    with torch.no_grad():
        for name, param in params.items():
            t = tensors[prefix + name]
            if tuple(t.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"tensor {prefix + name!r} has shape {list(t.shape)} in the checkpoint but the config "
                    f"expects {list(param.shape)}; check config.json against the weights"
                )
            if param.dtype == torch.float8_e4m3fn and t.dtype != torch.float8_e4m3fn:
                raise CheckpointError(
                    f"tensor {prefix + name!r} is {t.dtype} but quantization_config says FP8; "
                    "remove quantization_config from config.json or use the FP8 weights"
                )
            if t.dtype == torch.float8_e4m3fn and param.dtype != torch.float8_e4m3fn:
                t = kernels.reference.weight_dequant_float(t, tensors[prefix + name + "_scale_inv"])
            param.copy_(t.to(param.dtype))
    for m in module.modules():  # weights derived from the old parameters are stale now
        if hasattr(m, "reset_caches"):
            m.reset_caches()


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
               with_mtp: bool = True, progress: bool = True, dequantize_fp8: bool = False,
               routed_experts: bool = True):
    """Build the single-process model for the checkpoint at ``path`` and load its weights.
    ``dequantize_fp8``: run an FP8 checkpoint with ``dtype`` weights (dequantised once at load)."""
    from model.transformer import Transformer

    reader = CheckpointReader(path)
    args = reader.args
    if dequantize_fp8:
        args = args.replace(quant=None)
    with torch.device("meta"):
        model = Transformer(args, dtype, with_mtp=with_mtp, routed_experts=routed_experts)
    model = model.to_empty(device=device)
    model.rotary = type(model.rotary)(args).to(device)
    load_into(model, reader, progress=progress)
    return model.eval()
