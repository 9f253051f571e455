"""The prompt-free HRMedSeg models as bioimage.io model packages (format 0.5), checked by bioimageio.spec.

A package holds an ``rdf.yaml`` describing one input ``image`` (1, 3, S, S) float32 RGB pixels in
0..255 (S = the model's input size, 1024), normalised by the model's own mean / std as
bioimage.io preprocessing, and one output ``probabilities`` (1, C2, S, S) after a sigmoid
postprocessing, one channel per class; weights as TorchScript and as a PyTorch state dict (whose
architecture is :func:`hrmedseg.models.hrmedseg_model.hrmedseg_from_config`, so running it needs
``hrmedseg`` installed); a test input and the output it must give; the model card as
documentation; a cover image. Whole images larger than S must be tiled by the consumer (the
``hrmedseg segment`` CLI does that itself).
"""

from __future__ import annotations

import json
import keyword
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, WeightsError
from ..models.hrmedseg_model import HRMEDSEG_ARCHITECTURE, HRMedSeg, hrmedseg_from_checkpoint
from ..weights.checkpoint import read_checkpoint

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data"
# The test image of each bundled model: a CC0 sample of what it was trained on.
TEST_IMAGES = {"hrmedseg_fundus_disc_cup": "fundus_haggstrom_cc0.jpg"}
DEFAULT_TEST_IMAGE = "nuclei_fluorescence_dsb2018_4e1c889de3764694.png"
CITATION = ("Xu et al., HRMedSeg: unlocking high-resolution medical image segmentation via memory-efficient "
            "attention modeling (2025)", "https://arxiv.org/abs/2504.06205")


def _weights_path(name: str) -> tuple[Path, str]:
    """(file, model name) for a registry name or a bundle file."""
    from ..weights.registry import get_entry, resolve

    if Path(name).is_file():
        return Path(name), Path(name).stem
    entry = get_entry(name)
    if entry.architecture != HRMEDSEG_ARCHITECTURE:
        raise WeightsError(f"'{name}' is a {entry.architecture} model; bioimage.io export takes the prompt-free "
                           f"(architecture '{HRMEDSEG_ARCHITECTURE}') models, e.g. hrmedseg_nuclei")
    return resolve(name), name


def channel_ids(class_names: Sequence[str]) -> list[str]:
    """bioimage.io channel names for ``class_names``: unique Python identifiers, as the spec wants.

    A store's classes are free text (QuPath names classes "Tumor region" or "CD3+"), so other
    characters become ``_``, a leading digit gets a ``c`` before it, a keyword a ``_`` after it,
    and repeats a ``_2``, ``_3``... The names themselves stay in the output's description.
    """
    ids: list[str] = []
    for index, name in enumerate(class_names):
        ident = re.sub(r"[^0-9A-Za-z_]", "_", name.strip()) or f"channel_{index}"
        if ident[0].isdigit():
            ident = "c" + ident
        if keyword.iskeyword(ident):
            ident += "_"
        unique, n = ident, 2
        while unique in ids:
            unique, n = f"{ident}_{n}", n + 1
        ids.append(unique)
    return ids


def test_input(model: HRMedSeg, image: str | os.PathLike) -> np.ndarray:
    """(1, 3, S, S) float32 RGB pixels in 0..255: ``image`` resized to the model's input size."""
    from PIL import Image

    size = model.img_size
    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])


def _card(weights: Path, name: str, model: HRMedSeg, provenance: dict) -> str:
    """The model card: the registry's ``<weights>.md``, else one made from the bundle's provenance
    (a model fine-tuned here: its data, licence, recipe and validation scores)."""
    card = weights.with_suffix(".md")
    if card.is_file():
        return card.read_text(encoding="utf-8")
    lines = [f"# {name}", "", "HRMedSeg (LGViT + neck + ECM-Decoder), prompt-free, classes: "
             f"{', '.join(model.class_names or ['foreground'])}. Exported by hrmedseg from {weights.name}.", ""]
    if provenance:
        lines += ["## How it was made", "", "| | |", "| --- | --- |"]
        lines += [f"| {key} | {json.dumps(value) if isinstance(value, dict) else value} |" for key, value in provenance.items()]
    return "\n".join(lines) + "\n"


def export_bioimageio(name: str, out: str | os.PathLike, test_image: str | os.PathLike | None = None) -> Path:
    """Write the bioimage.io package of model ``name`` (registry name or bundle file) to folder ``out``.

    Also writes ``out.zip``, the single-file package. Returns the folder's ``rdf.yaml``.
    Raises WeightsError when ``name`` is not a prompt-free model, InputError when
    bioimageio.spec rejects the description (its message says what).
    """
    from bioimageio.spec import ValidationContext, save_bioimageio_package, save_bioimageio_package_as_folder

    weights, model_name = _weights_path(name)
    checkpoint = read_checkpoint(weights)
    model = hrmedseg_from_checkpoint(checkpoint).module.float().eval()
    image = Path(test_image) if test_image else SAMPLE_DIR / TEST_IMAGES.get(model_name, DEFAULT_TEST_IMAGE)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="hrmedseg-bioimageio-") as tmp_dir:
        tmp = Path(tmp_dir)
        raw = test_input(model, image)
        normalised = model.preprocessing.normalize(torch.from_numpy(raw))
        with torch.no_grad():
            logits = model(normalised)
            with warnings.catch_warnings():  # shape checks traced as constants: right for this fixed size
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, normalised, check_trace=False)
            traced_logits = traced(normalised)
        if not torch.allclose(traced_logits, logits, atol=1e-4):
            raise WeightsError(f"{weights}: TorchScript gives a different output "
                               f"(max diff {float((traced_logits - logits).abs().max()):.3g})")
        np.save(tmp / "test_input.npy", raw)
        np.save(tmp / "test_output.npy", torch.sigmoid(logits).numpy().astype(np.float32))
        torch.save(model.state_dict(), tmp / "weights.pt")
        traced.save(str(tmp / "weights.torchscript.pt"))
        (tmp / "README.md").write_text(_card(weights, model_name, model, checkpoint.provenance), encoding="utf-8")
        _cover(raw, torch.sigmoid(logits).numpy(), tmp / "cover.png")
        description = _description(model, model_name, checkpoint.preprocessing, tmp)
        with ValidationContext(perform_io_checks=True):
            save_bioimageio_package_as_folder(description, output_path=out)
            save_bioimageio_package(description, output_path=out.with_suffix(".zip"))
    return out / "rdf.yaml"


def _cover(raw: np.ndarray, probabilities: np.ndarray, path: Path) -> None:
    """Input and output side by side (output: the first class in grey), half size."""
    from PIL import Image

    rgb = raw[0].transpose(1, 2, 0).astype(np.uint8)
    prob = np.repeat((probabilities[0, 0] * 255).astype(np.uint8)[..., None], 3, axis=2)
    side = np.concatenate([rgb, prob], axis=1)
    Image.fromarray(side).resize((side.shape[1] // 2, side.shape[0] // 2)).save(path)


def _description(model: HRMedSeg, name: str, preprocessing: dict, folder: Path):
    """The bioimage.io ModelDescr (0.5) of a package whose files are in ``folder``."""
    import bioimageio.spec.model.v0_5 as bio
    from bioimageio.spec.generic.v0_3 import Author, CiteEntry

    import hrmedseg

    size = model.img_size
    class_names = list(model.class_names or ["foreground"])
    mean = [float(v) for v in model.preprocessing.pixel_mean]
    std = [float(v) for v in model.preprocessing.pixel_std]
    space = [bio.SpaceInputAxis(id=bio.AxisId("y"), size=size), bio.SpaceInputAxis(id=bio.AxisId("x"), size=size)]
    input_tensor = bio.InputTensorDescr(
        id=bio.TensorId("image"),
        description="RGB pixels, 0..255, resized or tiled to the model's input size",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in "RGB"]), *space],
        test_tensor=bio.FileDescr(source=folder / "test_input.npy"),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[bio.FixedZeroMeanUnitVarianceDescr(
            kwargs=bio.FixedZeroMeanUnitVarianceAlongAxisKwargs(mean=mean, std=std, axis=bio.AxisId("channel"))
        )],
    )
    output_tensor = bio.OutputTensorDescr(
        id=bio.TensorId("probabilities"),
        description=f"per-class probabilities: {', '.join(class_names)}",
        axes=[
            bio.BatchAxis(),
            bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in channel_ids(class_names)]),
            bio.SpaceOutputAxis(id=bio.AxisId("y"), size=bio.SizeReference(tensor_id=bio.TensorId("image"), axis_id=bio.AxisId("y"))),
            bio.SpaceOutputAxis(id=bio.AxisId("x"), size=bio.SizeReference(tensor_id=bio.TensorId("image"), axis_id=bio.AxisId("x"))),
        ],
        test_tensor=bio.FileDescr(source=folder / "test_output.npy"),
        postprocessing=[bio.SigmoidDescr()],
    )
    pytorch_version = bio.Version(torch.__version__.split("+")[0])
    weights = bio.WeightsDescr(
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt",
            architecture=bio.ArchitectureFromLibraryDescr(
                callable=bio.Identifier("hrmedseg_from_config"),
                import_from="hrmedseg.models.hrmedseg_model",
                kwargs={"config": model.config_dict(), "preprocessing": preprocessing},
            ),
            pytorch_version=pytorch_version,
        ),
        torchscript=bio.TorchscriptWeightsDescr(
            source=folder / "weights.torchscript.pt", pytorch_version=pytorch_version, parent="pytorch_state_dict",
        ),
    )
    try:
        return bio.ModelDescr(
            name=f"HRMedSeg {name.replace('_', ' ')}",
            description=f"Prompt-free HRMedSeg (LGViT + ECM-Decoder) segmenting {', '.join(class_names)}; "
                        f"exported by hrmedseg {hrmedseg.__version__}.",
            authors=[Author(name="napari-hrmedseg contributors")],
            cite=[CiteEntry(text=CITATION[0], url=CITATION[1])],
            license=bio.LicenseId("Apache-2.0"),
            documentation=bio.FileDescr(source=folder / "README.md"),
            covers=[bio.FileDescr(source=folder / "cover.png")],
            tags=["segmentation", "hrmedseg", "pytorch", *class_names],
            inputs=[input_tensor],
            outputs=[output_tensor],
            weights=weights,
        )
    except ValueError as err:  # pydantic's ValidationError: bioimageio.spec says what is wrong
        raise InputError(f"bioimageio.spec rejects the description of {name}: {err}") from err
