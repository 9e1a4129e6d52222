"""benchmarks/compare_official.py: its command line and the import of the official code."""
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_official.py"


def _run(*args, **kwargs):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                        **kwargs)


def test_official_src_is_required_and_checked(tmp_path):
  for args in ([], [f"--official_src={tmp_path}"]):
    proc = _run(str(SCRIPT), "--k=1", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "github.com/iffsid/mmvae" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _fake_official_src(root: pathlib.Path) -> pathlib.Path:
  """A src/ tree with the official layout whose files import what the real ones import."""
  src = root / "src"
  (src / "models").mkdir(parents=True)
  (src / "models" / "__init__.py").write_text("raise RuntimeError('models/__init__ ran')\n")
  (src / "vis.py").write_text("raise RuntimeError('vis ran')\n")
  (src / "datasets.py").write_text("raise RuntimeError('datasets ran')\n")
  (src / "utils.py").write_text("from datasets import CUBImageFt\nEXPERT = 'utils'\n")
  (src / "objectives.py").write_text("from utils import EXPERT\nm_dreg_looser = EXPERT\n")
  for name in ("mmvae", "vae", "vae_mnist", "vae_svhn"):
    (src / "models" / f"{name}.py").write_text("from vis import plot_embeddings\n")
  (src / "models" / "mmvae_mnist_svhn.py").write_text(textwrap.dedent("""\
      from torchnet.dataset import TensorDataset, ResampleDataset
      from torchvision.utils import save_image, make_grid
      from torchvision import datasets, transforms
      from vis import plot_embeddings, plot_kls_df
      from .mmvae import *
      class MNIST_SVHN:
          pass
      """))
  return src


def test_import_official_stubs_unused_modules(tmp_path):
  src = _fake_official_src(tmp_path)
  code = textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {str(SCRIPT.parent)!r})
      import compare_official
      cls, objectives = compare_official.import_official(compare_official.pathlib.Path({str(src)!r}))
      assert cls.__name__ == "MNIST_SVHN" and objectives.m_dreg_looser == "utils"
      try:
          sys.modules["vis"].plot_embeddings()
      except RuntimeError as e:
          assert "stubbed" in str(e)
      else:
          raise AssertionError("a stub ran")
      print("ok")
      """)
  proc = _run("-c", code, cwd=tmp_path)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_matmul_shapes_are_the_decoder_products():
  sys.path.insert(0, str(SCRIPT.parent))
  try:
    import compare_official
  finally:
    sys.path.remove(str(SCRIPT.parent))
  shapes = compare_official.matmul_shapes()
  assert shapes[0] == (32, 20, 2048)  # 1×1 → 4×4×128
  # Layer 2 (4×4×128 → 8×8×64): forward, input gradient and weight gradient share their FLOPs.
  assert shapes[1:4] == [(512, 128, 1024), (512, 1024, 128), (128, 512, 1024)]
  assert shapes[-3:] == [(8192, 32, 48), (8192, 48, 32), (32, 8192, 48)]
