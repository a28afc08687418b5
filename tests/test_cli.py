"""``./dev run``'s entry point: writes PNGs, loads a diffusers folder, rejects bad settings."""

from __future__ import annotations

import pytest
from PIL import Image

from seg_tsam.extension import cli


def test_tiny_model_writes_seg_and_baseline_pngs(tmp_path, capsys):
    out, baseline = tmp_path / "seg.png", tmp_path / "base.png"
    cli.main(["--steps", "2", "--size", "48x40", "--sigma", "2", "--out", str(out), "--baseline", str(baseline)])
    seg_image, base_image = Image.open(out), Image.open(baseline)
    assert seg_image.size == base_image.size == (48, 40)
    assert seg_image.tobytes() != base_image.tobytes()
    assert "wrote" in capsys.readouterr().out


def test_loads_a_saved_diffusers_pipeline_folder(tmp_path, tiny_sd_pipe):
    folder = tmp_path / "pipe"
    tiny_sd_pipe.save_pretrained(folder)
    out = tmp_path / "seg.png"
    cli.main(["--model", str(folder), "--steps", "2", "--size", "32x32", "--out", str(out)])
    assert Image.open(out).size == (32, 32)


def test_tsam_flag_changes_the_image(tmp_path):
    plain, aligned = tmp_path / "plain.png", tmp_path / "tsam.png"
    common = ["--steps", "2", "--size", "64x48", "--no-seg", "--prompt", "a red cat"]
    cli.main(common + ["--out", str(plain)])
    cli.main(common + ["--tsam", "--out", str(aligned)])
    assert Image.open(plain).tobytes() != Image.open(aligned).tobytes()


@pytest.mark.parametrize("argv, message", [(["--sigma", "-1"], "sigma"), (["--layers", "q9"], "layers"),
                                           (["--size", "big"], "--size"), (["--tsam-strength", "-2"], "strength")])
def test_bad_arguments_exit_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)
