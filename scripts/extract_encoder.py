"""Save the LGViT + neck encoder of a complete model (e.g. a box model) as an encoder bundle.

Used between rounds of device/train_default_models.sh: the prompt-free default models start from
the encoder of the box model's first round.

Usage: python scripts/extract_encoder.py MODEL.pt ENCODER.pt
"""

from __future__ import annotations

import sys

from hrmedseg.models import load_model, save_encoder
from hrmedseg.models.neck import HRMedSegEncoder


def main(source: str, dest: str) -> None:
    model = load_model(source)
    encoder = next(m for m in model.modules() if isinstance(m, HRMedSegEncoder))
    save_encoder(encoder, dest, provenance={"source": f"encoder of {source}"})
    print(f"{dest}: LGViT + neck from {source}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
