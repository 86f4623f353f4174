"""best.pt -> model.onnx (dynamic batch, self-describing metadata), checked by ONNX Runtime.

The graph outputs raw logits; the decision chain's settings (temperature, metadata prior, operating point, TTA
views, lesion pooling) travel in the metadata, and the ONNX backend's logits go through the same
``DecisionChain`` as the torch backend's, so both report the same probabilities and decisions.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from skinlesion import fileio
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.decision.chain import DecisionChain
from skinlesion.errors import SkinLesionError
from skinlesion.model import checkpoint

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TOLERANCE = 1e-4  # max abs difference allowed between PyTorch and ONNX Runtime probabilities
# torch's dynamo exporter implements opset 18 and later; below 18 it silently writes 18, and past the installed
# onnx package's newest opset it silently writes 18 as well. Verified 18-28 with torch 2.14 / onnx 1.23.
MIN_OPSET = 18


def max_opset() -> int:
    """The newest opset the installed onnx package defines (the exporter cannot write a later one)."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    """Refuse, before any work, an opset the exporter cannot write."""
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise SkinLesionError(
            f"--opset {opset} cannot be written by torch's ONNX exporter (it writes {MIN_OPSET}-{top} with the "
            f"installed onnx); pass --opset {MIN_OPSET} (the default) or up to {top}"
        )


def written_opset(model: bytes | str | Path) -> int:
    """The default-domain opset an ONNX model (bytes or a file) declares."""
    import onnx

    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        proto = onnx.load(str(model), load_external_data=False)
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise SkinLesionError("the ONNX model declares no default-domain opset; export is broken")
    return int(versions[0])


def metadata(meta: dict[str, Any], source_sha256: str) -> dict[str, str]:
    """``metadata_props`` of model.onnx: everything a consumer needs, JSON-encoded strings."""
    chain = DecisionChain.from_meta(meta)
    preprocessing = Preprocessing.from_meta(meta)
    return {
        # data.preprocessing.Preprocessing: decode, colour, resize, crop, mean / std; every backend's input.
        "preprocessing": json.dumps(preprocessing.to_dict()),
        "classes": json.dumps(list(meta["classes"])),
        "class_names": json.dumps(meta.get("class_names")),
        "mean": json.dumps([float(v) for v in meta["mean"]]),
        "std": json.dumps([float(v) for v in meta["std"]]),
        "img_size": str(int(meta["img_size"])),
        "resize_size": str(int(meta["resize_size"])),
        "temperature": repr(chain.temperature),
        "backbone": str(meta["backbone"]),
        "tta_views": str(chain.tta_views),
        # decision.lesion_pooling: images sharing a lesion_id are scored together by default ("true"/"false").
        "pool_lesions": json.dumps(chain.pool_lesions),
        "source_sha256": source_sha256,
        "input_name": INPUT_NAME,
        "output": "logits (apply softmax(logits / temperature + metadata offset))",
        # p(class | age, sex, site) for decision.metadata_prior.offsets; "null" when the run has none.
        "metadata_prior": json.dumps(chain.metadata_prior),
        # decision.operating_point: decide argmax(log p + "bias") ("classes" order); "null" = plain argmax.
        "operating_point": json.dumps(chain.operating_point),
        # decision.safeguards: the referral rule, conformal label sets, out-of-distribution detector ("null": none).
        "referral": json.dumps(meta.get("referral")),
        "conformal": json.dumps(meta.get("conformal")),
        "ood": json.dumps(meta.get("ood")),
        # An ensemble's members (model.ensemble: one graph, logits averaged inside it); "null" for one network.
        "members": json.dumps((meta.get("config") or {}).get("members")),
    }


def to_onnx_bytes(model: torch.nn.Module, img_size: int, opset: int) -> bytes:
    """Export with the torch.export-based (dynamo) exporter; batch is a dynamic dimension."""
    # Batch 2 as the example: torch.export specialises dimensions of size 0 and 1.
    example = torch.randn(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = io.StringIO()
    try:
        # The exporter prints progress lines to stdout; keep stdout for our own messages.
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - any exporter failure is reported in one line
        raise SkinLesionError(
            f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"try another --opset ({MIN_OPSET}-{max_opset()})"
        ) from e
    written = [o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")]
    if written != [opset]:
        raise SkinLesionError(
            f"the exporter wrote opset {written[0] if written else '?'} instead of the requested {opset}; nothing "
            f"written — pass --opset {written[0] if written else MIN_OPSET}"
        )
    return program.model_proto.SerializeToString()


def add_metadata(model_bytes: bytes, props: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(model_bytes)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def sample_inputs(preprocessing: Preprocessing, n_real: int = 3, seed: int = 0) -> torch.Tensor:
    """Bundled real HAM10000 images through the run's preprocessing, plus one random-pixel image, normalised.

    Real images keep the logits in their usual range, so the probability check is not blunted by a
    saturated softmax. The batch (n_real + 1) differs from the export batch (2): dynamic batch exercised.
    """
    from skinlesion.data.ham10000 import sample_dir

    files = sorted((sample_dir() / "images").glob("*.jpg"))[:n_real]
    size = preprocessing.img_size
    noise = torch.randint(0, 256, (1 + n_real - len(files), 3, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
    batch = torch.cat([preprocessing.batch(files), noise]) if files else noise
    return preprocessing.normalizer("cpu")(batch)


def check_against_torch(
    model: torch.nn.Module, model_bytes: bytes, x: torch.Tensor, chain: DecisionChain
) -> tuple[float, float, float]:
    """Max abs differences of the calibrated probabilities and of the logits (ONNX Runtime vs PyTorch on
    ``x``), and the largest |logit|."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = model(x).float()
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    if got.shape != ref.shape:
        raise SkinLesionError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}; export is broken")
    p_diff = float(abs(chain.probabilities(got.numpy()) - chain.probabilities(ref.numpy())).max())
    return p_diff, (got - ref).abs().max().item(), ref.abs().max().item()


def export_onnx(
    run_dir: str | Path, out: str | Path | None = None, opset: int = 18
) -> tuple[Path, float, float, float]:
    """Write ``out`` (default RUN/model.onnx) atomically, only after ONNX Runtime agrees with PyTorch.

    Returns the path, max |dp|, max |dlogit| and the largest |logit| seen in the check.
    """
    check_opset(opset)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "best.pt" if run_dir.is_dir() else run_dir
    loaded = checkpoint.load(ckpt_path)
    model = loaded.model.float().eval()
    onnx_bytes = to_onnx_bytes(model, loaded.preprocessing.img_size, opset)
    onnx_bytes = add_metadata(onnx_bytes, metadata(loaded.meta, fileio.sha256_file(ckpt_path)))
    x = sample_inputs(loaded.preprocessing)
    p_diff, logit_diff, logit_scale = check_against_torch(model, onnx_bytes, x, DecisionChain.from_meta(loaded.meta))
    # Logits are compared relative to their size: random pixels can push them into the thousands.
    if not (p_diff <= TOLERANCE and logit_diff <= TOLERANCE * max(1.0, logit_scale)):
        raise SkinLesionError(
            f"ONNX Runtime and PyTorch disagree: max |dp| = {p_diff:.2e}, max |dlogit| = {logit_diff:.2e} "
            f"(logits up to {logit_scale:.3g}; tolerance {TOLERANCE:g}); nothing written — try another --opset"
        )
    target = Path(out) if out else ckpt_path.parent / "model.onnx"
    fileio.write_bytes(target, onnx_bytes)
    return target, p_diff, logit_diff, logit_scale
