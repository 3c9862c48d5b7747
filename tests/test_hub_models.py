"""Both model kinds through the Hugging Face hub and back: `push_to_hub` / `maetok push` write config.json,
model.safetensors and a model card; `load_tokenizer`, `load_sit`, `from_pretrained` and `maetok sample` read hub
ids; offline or without a token the user gets one line and exit code 2. The hub is a local folder here: the hub
client's download and upload functions are replaced, so nothing touches the network."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import maetok
from maetok.commands.common import ExitCode
from maetok.config import SiTConfig, TokenizerConfig
from maetok.diffusion.sit import SiT
from maetok.io.hub_upload import HubUploadError
from maetok.io.pretrained import save_pretrained
from maetok.tokenizer import MAETok
from test_exit_codes import error_line
from test_cli_errors import run

hf = pytest.importorskip("huggingface_hub")
hf_errors = pytest.importorskip("huggingface_hub.errors")

METRICS = {"maetok": {"rfid[resnet56-cifar10]@2000": 12.3456789, "psnr@2000": 21.5, "latent_shape": [4, 4]},
           "budget": "quick"}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved off its init, so that zero-initialised layers are compared too."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """A tiny tokenizer making 4x4 latents and a tiny class-conditional SiT on them, with their folders."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = _perturbed(MAETok(TokenizerConfig(variant="maetok", image_size=16, patch_size=4, latent_tokens=4,
                                            latent_dim=4, enc_width=32, enc_heads=2, enc_depth=1, dec_width=32,
                                            dec_heads=2, dec_depth=1, aux_targets=[])))
    sit = _perturbed(SiT(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=1, heads=2, num_classes=10)))
    return SimpleNamespace(tok=tok, sit=sit, tok_dir=save_pretrained(tok, root / "tok"),
                           sit_dir=save_pretrained(sit, root / "sit"))


@pytest.fixture
def hub(tmp_path, monkeypatch) -> SimpleNamespace:
    """A fake hub in tmp_path/hub (one folder per repository) behind huggingface_hub's own entry points, and a
    working folder with no `org/` in it (where `org/name` would read as a local path)."""
    state = SimpleNamespace(root=tmp_path / "hub", cache=tmp_path / "cache", downloads=[], created={}, commits=[])

    def hf_hub_download(repo_id, filename, **kwargs):
        state.downloads.append((repo_id, filename))
        src = state.root / repo_id / filename
        if not src.is_file():
            raise hf_errors.EntryNotFoundError(f"{filename} is not in {repo_id}")
        snapshot = state.cache / repo_id / "snapshots" / "main"  # the layout of the real cache: one per commit
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(shutil.copyfile(src, snapshot / filename))

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        assert token and exist_ok
        (state.root / repo_id).mkdir(parents=True, exist_ok=True)
        state.created[repo_id] = private
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, token=None, **kwargs):
        assert repo_id in state.created and token
        shutil.copytree(folder_path, state.root / repo_id, dirs_exist_ok=True)
        state.commits.append((repo_id, commit_message))

    monkeypatch.setattr(hf, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(hf.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hf.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return state


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.inference_state_dict() if isinstance(model, MAETok) else model.state_dict()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _card(folder: Path) -> tuple[dict, str]:
    """(front matter, body) of a model card."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


# ==============================================================================================================
# Pushing
# ==============================================================================================================
def test_a_pushed_tokenizer_folder_has_its_files_and_a_model_card(models, hub, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(METRICS))
    url = maetok.push_to_hub(models.tok_dir, "org/tok", metrics=report)
    assert url == "https://huggingface.co/org/tok" and hub.created == {"org/tok": False}
    repo = hub.root / "org" / "tok"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (repo / "model.safetensors").read_bytes() == (models.tok_dir / "model.safetensors").read_bytes()
    front, body = _card(repo)
    assert front["library_name"] == "maetok" and front["license"] == "other"
    assert "maetok/image-tokenizer" in front["tags"]
    params = sum(v.numel() for v in models.tok.inference_state_dict().values())
    for fact in ("| variant | maetok |", "| latent tokens | 4 |", "| encoder width / depth / heads | 32 / 1 / 2 |",
                 f"| parameters | {params:,} |", '"latent_tokens": 4'):
        assert fact in body, fact
    # The metrics, to 4 significant digits, under their section; a cell's `|` cannot break the table.
    assert "### maetok" in body and "| rfid[resnet56-cifar10]@2000 | 12.35 |" in body
    assert "| psnr@2000 | 21.5 |" in body and "| budget | quick |" in body
    assert 'maetok.load_tokenizer("org/tok")' in body
    assert "maetok sample --model ORG/SIT --tokenizer org/tok" in body


def test_a_pushed_sit_model_has_a_diffusion_card(models, hub):
    maetok.push_to_hub(models.sit, "org/sit", private=True, metrics={"gfid": 30.0}, license="mit",
                       commit_message="first")
    repo = hub.root / "org" / "sit"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert hub.created == {"org/sit": True} and hub.commits == [("org/sit", "first")]
    front, body = _card(repo)
    assert front["license"] == "mit" and "diffusion" in front["tags"]
    params = sum(v.numel() for v in models.sit.state_dict().values())
    for fact in ("| variant | sit |", "| latent tokens | 4 |", "| width / depth / heads | 32 / 1 / 2 |",
                 f"| parameters | {params:,} |", "| classes | 10 |", "| gfid | 30 |"):
        assert fact in body, fact
    assert 'maetok.load_sit("org/sit")' in body and "maetok sample --model org/sit --tokenizer ORG/TOKENIZER" in body


def test_push_refuses_what_it_could_not_load_back(models, hub, tmp_path):
    with pytest.raises(HubUploadError, match="give it as org/name"):
        maetok.push_to_hub(models.tok_dir, "just-a-name")
    broken = tmp_path / "broken"
    shutil.copytree(models.sit_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "depth": 2}))  # weights of one block, config of two
    with pytest.raises(ValueError, match="does not match SiT"):
        maetok.push_to_hub(broken, "org/broken")
    assert hub.commits == []


# ==============================================================================================================
# Loading hub ids, and sampling from them
# ==============================================================================================================
def test_hub_ids_load_back_through_every_loader(models, hub):
    maetok.push_to_hub(models.tok, "org/tok")
    maetok.push_to_hub(models.sit_dir, "org/sit")
    tok, sit = maetok.load_tokenizer("org/tok"), maetok.load_sit("org/sit")
    assert isinstance(tok, MAETok) and isinstance(sit, SiT) and not tok.training and not sit.training
    assert _same_weights(tok, models.tok) and _same_weights(sit, models.sit)
    # from_pretrained reads the downloaded config.json's kind
    any_tok, any_sit = maetok.from_pretrained("org/tok"), maetok.from_pretrained("org/sit")
    assert isinstance(any_tok, MAETok) and _same_weights(any_tok, models.tok)
    assert isinstance(any_sit, SiT) and _same_weights(any_sit, models.sit)
    assert {repo for repo, _ in hub.downloads} == {"org/tok", "org/sit"}


def test_sample_reads_both_models_from_the_hub(models, hub):
    maetok.push_to_hub(models.tok_dir, "org/tok")
    maetok.push_to_hub(models.sit_dir, "org/sit")
    code, out, err = run("sample", "--model", "org/sit", "--tokenizer", "org/tok", "--num-samples", 2, "--steps", 2,
                         "--sampler", "euler", "--batch-size", 2, "--device", "cpu", "--out", "samples")
    assert code == 0, err
    assert (Path("samples") / "samples.npz").is_file() and (Path("samples") / "samples.png").is_file()
    settings = json.loads((Path("samples") / "sampling.json").read_text())
    assert (settings["model"], settings["tokenizer"]) == ("org/sit", "org/tok")  # hub ids recorded as given


def test_a_repository_without_weights_is_named(models, hub):
    (hub.root / "org" / "empty").mkdir(parents=True)
    shutil.copyfile(models.sit_dir / "config.json", hub.root / "org" / "empty" / "config.json")
    with pytest.raises(FileNotFoundError, match="SiT org/empty: could not download model.safetensors"):
        maetok.load_sit("org/empty")


# ==============================================================================================================
# The command line: push, and the one-line failures
# ==============================================================================================================
def test_push_command(models, hub, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(METRICS))
    code, out, err = run("push", "--model", models.sit_dir, "--repo", "org/cli", "--private", "--token", "hf_x",
                         "--metrics", report)
    assert code == 0, err
    assert "https://huggingface.co/org/cli" in out and hub.created == {"org/cli": True}
    assert "| psnr@2000 | 21.5 |" in (hub.root / "org" / "cli" / "README.md").read_text()
    not_json = tmp_path / "notes.json"
    not_json.write_text("{not json")
    line = error_line(ExitCode.BAD_REQUEST, "push", "--model", models.sit_dir, "--repo", "org/cli", "--metrics",
                      not_json)
    assert f"metrics file {not_json}: not valid JSON" in line


def test_offline_download_is_one_line_with_exit_code_2(models, hub, monkeypatch):
    def offline(repo_id, filename, **kwargs):
        raise hf_errors.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                                "cannot find the requested files in the local cache.\nMore text.")

    monkeypatch.setattr(hf, "hf_hub_download", offline)
    line = error_line(ExitCode.BAD_REQUEST, "sample", "--model", "org/sit", "--tokenizer", models.tok_dir,
                      "--out", "samples")
    assert "org/sit: no such folder here, and as a hub id: could not download config.json from the hub " \
           "repository org/sit (LocalEntryNotFoundError: An error happened" in line
    assert "offline machine" in line and "More text" not in line
    with pytest.raises(FileNotFoundError, match="could not download config.json"):
        maetok.from_pretrained("org/tok")


def test_offline_push_is_one_line_with_exit_code_2(models, hub, monkeypatch):
    def offline(self, repo_id, **kwargs):
        raise hf_errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode "
                                             "is enabled.")

    monkeypatch.setattr(hf.HfApi, "create_repo", offline)
    line = error_line(ExitCode.BAD_REQUEST, "push", "--model", models.tok_dir, "--repo", "org/tok")
    assert "pushing to the hub repository org/tok failed (OfflineModeIsEnabled" in line
    assert "cannot be reached" in line


def test_push_without_a_token_is_one_line_before_any_upload(models, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hf, "get_token", lambda: None)  # no token saved by `hf auth login` either
    line = error_line(ExitCode.BAD_REQUEST, "push", "--model", models.tok_dir, "--repo", "org/tok")
    assert "no Hugging Face token to push org/tok with" in line and "hf auth login" in line
    assert hub.created == {} and hub.commits == []
