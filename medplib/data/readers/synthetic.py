"""The synthetic source (`synth`): the deterministic phantom generator, staged under the home by its parameters.

Records the generator writes in another source's layout (`Task.synth_source`, e.g. `medgrit/`) are read by that
source's reader (`Reader.convert`) into the staged MeCoVQA folder, and what it rejects is quarantined as usual."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from medplib.data.readers import Reader, Staged, StagingContext, get, register


def stage_synth(path: Path | None, ctx: StagingContext) -> Staged:
    from medplib.data.synth import generate

    d = ctx.cfg.data
    seed = d.synth_seed if ctx.seed is None else ctx.seed
    name = f"synth(n={d.synth_n},seed={seed},size={d.image_size},zeroshot={','.join(d.zeroshot_modalities)})"
    out = ctx.home.sources / hashlib.sha256(name.encode()).hexdigest()[:16]
    if out.exists():
        shutil.rmtree(out)
    summary = generate(out, n=d.synth_n, seed=seed, image_size=d.image_size,
                       zeroshot_modalities=d.zeroshot_modalities, test_fraction=d.test_fraction)
    problems = []
    for kind in summary.sources:
        reader = get(kind)
        if reader.convert is None:
            raise ValueError(f"Tasks write synthetic records in the {kind!r} layout, but the {kind!r} reader "
                             f"({reader.module}) has no convert(folder, out) to read them")
        problems += reader.convert(out / kind, out)
    return out, problems, name


register(Reader("synth", stage_synth, takes_folder=False, describe="synthetic phantoms of the 8 modalities"))
