"""The synthetic source (`synth`): the deterministic phantom generator, staged under the home by its parameters."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from medplib.data.readers import Reader, Staged, StagingContext, register


def stage_synth(path: Path | None, ctx: StagingContext) -> Staged:
    from medplib.data.synth import generate

    d = ctx.cfg.data
    seed = d.synth_seed if ctx.seed is None else ctx.seed
    name = f"synth(n={d.synth_n},seed={seed},size={d.image_size},zeroshot={','.join(d.zeroshot_modalities)})"
    out = ctx.home.sources / hashlib.sha256(name.encode()).hexdigest()[:16]
    if out.exists():
        shutil.rmtree(out)
    generate(out, n=d.synth_n, seed=seed, image_size=d.image_size, zeroshot_modalities=d.zeroshot_modalities,
             test_fraction=d.test_fraction)
    return out, [], name


register(Reader("synth", stage_synth, takes_folder=False, describe="synthetic phantoms of the 8 modalities"))
