"""`python -m flipjax.embed`: any image Pillow reads (any size or mode) is embedded, an unreadable
file is reported and skipped, and embeddings are L2-normalised."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from test_evaluate_cli import save_initial_run

from flipjax.embed import list_images, load_image


def write_images(folder):
    """Readable images of assorted modes and shapes, one broken file; returns their names."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8))
    os.makedirs(folder / "nested", exist_ok=True)
    rgb.save(folder / "a.png")
    rgb.save(folder / "a_copy.bmp")  # same pixels, other format
    rgb.convert("L").save(folder / "grey.jpg")
    rgb.convert("RGBA").save(folder / "nested" / "alpha.png")
    rgb.convert("P").save(folder / "palette.gif")
    Image.new("CMYK", (3, 200), (0, 50, 0, 0)).save(folder / "thin_cmyk.tif")
    Image.fromarray(np.full((8, 9), 40000, np.uint16)).save(folder / "deep16.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    return ["a.png", "a_copy.bmp", "deep16.png", "grey.jpg", "nested/alpha.png",
            "palette.gif", "thin_cmyk.tif"]


def test_load_image_any_mode_and_size(tmp_path, capsys):
    good = write_images(tmp_path)
    for name in good:
        for resize in ("center_crop", "squash"):
            image = load_image(str(tmp_path / name), 16, resize)
            assert image.shape == (16, 16, 3) and image.dtype == np.uint8, name
    # 40000 / 65535 * 255 = 155.6: rescaled, not clipped to white.
    assert 150 < load_image(str(tmp_path / "deep16.png"), 16, "center_crop").mean() < 160
    # The 30x40 noise: squashed whole, or its middle 30x30 scaled.
    cropped, squashed = (load_image(str(tmp_path / "a.png"), 16, r)
                         for r in ("center_crop", "squash"))
    assert not np.array_equal(cropped, squashed)
    assert load_image(str(tmp_path / "broken.jpg"), 16, "center_crop") is None
    assert load_image(str(tmp_path / "empty.png"), 16, "center_crop") is None
    assert "broken.jpg" in capsys.readouterr().err
    assert len(list_images(str(tmp_path))) == len(good) + 2
    assert [os.path.basename(p) for p in list_images(str(tmp_path / "*.png"))] == [
        "a.png", "deep16.png", "empty.png"]


@pytest.fixture(scope="module")
def workdir(tiny_data, tmp_path_factory):
    from conftest import load_config

    config = load_config()
    config.data.data_dir, config.tokenizer.path = tiny_data
    path = str(tmp_path_factory.mktemp("embed_run"))
    save_initial_run(config, path)
    return path


def embed_cli(*args):
    return subprocess.run([sys.executable, "-m", "flipjax.embed", *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=600)


def test_cli_embeds_images_and_texts(workdir, tmp_path):
    images = tmp_path / "images[1]"  # a folder name glob would read as a pattern
    good = write_images(images)
    texts = tmp_path / "texts.txt"  # with a byte-order mark, as some editors save UTF-8
    long = " ".join(["a smiling young woman with long dark hair"] * 8)  # past 16 tokens
    texts.write_bytes(f"\ufeffa man wearing glasses\n\n  a smiling woman  \n{long}\n".encode())
    out = tmp_path / "out" / "emb.npz"
    proc = embed_cli(f"--workdir={workdir}", f"--images={images}", f"--texts={texts}",
                     f"--output={out}", "--batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.jpg" in proc.stderr and "empty.png" in proc.stderr
    assert "1 of 3 texts are longer than the text tower's 16 tokens" in proc.stderr
    with np.load(out) as f:
        files = [os.path.relpath(p, images) for p in f["image_files"]]
        img, txt = f["image_embeddings"], f["text_embeddings"]
        assert list(f["texts"]) == ["a man wearing glasses", "a smiling woman", long]
    assert files == good
    assert img.shape[0] == len(good) and txt.shape == (3, img.shape[1])
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(img[0], img[1], atol=1e-5)  # PNG and BMP of the same pixels
    assert not np.allclose(img[0], img[3], atol=1e-3)  # and a different image differs
    # Again into the same file: refused before anything is embedded, unless told.
    again = embed_cli(f"--workdir={workdir}", f"--texts={texts}", f"--output={out}")
    assert again.returncode != 0 and "emb.npz exists; pass --overwrite" in again.stderr
    again = embed_cli(f"--workdir={workdir}", f"--texts={texts}", f"--output={out}",
                      "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    with np.load(out) as f:
        assert "image_embeddings" not in f and f["text_embeddings"].shape == txt.shape


def test_cli_refuses_a_texts_file_without_text(workdir, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    proc = embed_cli(f"--workdir={workdir}", f"--texts={tmp_path / 'blank.txt'}",
                     f"--output={tmp_path / 'out'}")
    assert proc.returncode != 0 and "blank.txt holds no text" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.npz").exists()
