"""`make demo-style`: the style stages on the bundled generator and its seeded companion models (untrained: this
shows the pipeline, not style quality) and the public-domain face photos of `make demo`:
destylize (portraits -> paired faces), stylize (faces x 3 exemplars), translate (CycleGAN on the aligned faces)."""

from __future__ import annotations

import sys
from pathlib import Path

from models.companions import write_all
from ops.destylize import DestylizeConfig, DestylizeStageConfig
from ops.stylize import StylizeConfig
from ops.translate import TranslateConfig
from pipelines.cli import native_stderr_to_log, summary_line
from pipelines.demo import write_face_photos
from pipelines.driver import RunOptions, run


def main(out: str = "out", steps: int = 100) -> None:
    root = Path(out)
    photos = root / "demo_inputs" / "faces"
    write_face_photos(photos)
    models = write_all(str(root / "companions"))
    print("LPIPS: using a RANDOM AlexNet backbone (no ImageNet weights offline); companions are untrained.")
    cfg = DestylizeConfig(steps=steps, lpips_net="alex", lpips_backbone="random")
    runs = {  # FFHQ alignment (the default): the photo without a face becomes a failed row
        "destylized": ("destylize", DestylizeStageConfig(models["finetuned"], models["encoder"],
                                                         identity=models["identity"], destylize=cfg)),
        "stylized": ("stylize", StylizeConfig(models["dualstylegan"], models["encoder"], models["exstyles"],
                                              styles=("0", "1", "2"))),
        "translated": ("translate", TranslateConfig(models["cyclegan"])),
    }
    for name, (stage, config) in runs.items():
        output = root / name
        stats = run(stage, [str(photos)], str(output), config, options=RunOptions(overwrite=True))
        print(f"{name}: {summary_line(stats)} in {stats['seconds']:.0f} s — report: {stats.get('report')}")
    print("For real work pass the official checkpoints: --finetuned/--encoder/--identity (destylize), "
          "--dualstylegan/--exstyles (stylize), --translator (translate).")


if __name__ == "__main__":
    with native_stderr_to_log():  # Ray's native log lines to a file, as the CLI does
        main(*sys.argv[1:2])
