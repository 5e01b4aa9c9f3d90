"""Report-generation adapter: the frozen encoder's patch tokens as the prefix of a small causal LM.

As the seed papers describe it (RayDINO, RAD-DINO, XR-0 generate reports from the frozen encoder):
the patch tokens are average-pooled onto a ``prefix_grid`` x ``prefix_grid`` grid, normalised and
projected (:class:`PrefixProjector`) into the input embeddings of a causal language model, which
then writes the text after a ``[BOS]`` token, greedily, at most ``max_new_tokens`` tokens.

In a bundle (``manifest.json``, ``adapters.report``)::

    "report": {"path": "adapters/report", "format": "prefix-lm",
               "files": {"lm/config.json": "<sha256>", "lm/model.safetensors": "<sha256>",
                         "lm/generation_config.json": "<sha256>",
                         "tokenizer.json": "<sha256>", "projector.safetensors": "<sha256>"},
               "prefix_grid": 8, "max_new_tokens": 24, "trained_on": "..."}

The LM is a transformers ``GPT2LMHeadModel`` loaded from the bundle folder only
(``local_files_only=True``); the tokenizer is a word-level ``tokenizers`` tokenizer built from
the training texts and saved with it, so nothing is ever downloaded. Every file's sha256 is
checked (by ``load_bundle``) before any is read.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_KIND",
    "ReportAdapter",
    "ReportAdapterError",
    "PrefixProjector",
    "build_tokenizer",
    "load_report_adapter",
    "new_language_model",
    "report_files",
    "save_report_adapter",
]

REPORT_KIND = "report"
REPORT_FORMAT = "prefix-lm"
LM_DIR = "lm"
TOKENIZER_FILE = "tokenizer.json"
PROJECTOR_FILE = "projector.safetensors"
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIALS = [PAD, UNK, BOS, EOS]


class ReportAdapterError(ValueError):
    """The report adapter cannot be used; the message names the file or field at fault."""


def build_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level tokenizer (lower case, words and punctuation) over ``texts``; no download."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    return tok


def new_language_model(
    vocab_size: int,
    n_positions: int,
    *,
    n_embd: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    seed: int = 0,
) -> Any:
    """A small GPT-2 with seeded random weights, built from a config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=SPECIALS.index(BOS),
        eos_token_id=SPECIALS.index(EOS),
        pad_token_id=SPECIALS.index(PAD),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg)


class PrefixProjector(nn.Module):
    """Patch tokens [B, h*w, D] -> LM input embeddings [B, grid*grid, E]."""

    def __init__(self, dim: int, embed: int, grid: int) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError("prefix grid must be at least 1")
        self.grid = grid
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed)

    def forward(self, patches: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, d = patches.shape
        h, w = hw
        if n != h * w:
            raise ValueError(f"{n} patch tokens do not fill a {h} x {w} grid")
        x = patches.transpose(1, 2).reshape(b, d, h, w)
        x = F.adaptive_avg_pool2d(x, (self.grid, self.grid)).flatten(2).transpose(1, 2)
        return self.proj(self.norm(x))


class ReportAdapter(nn.Module):
    """Projector + causal LM + tokenizer. ``generate`` is greedy and bounded."""

    def __init__(
        self, projector: PrefixProjector, lm: Any, tokenizer: Any, max_new_tokens: int = 24
    ) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        ids = {t: tokenizer.token_to_id(t) for t in SPECIALS}
        if any(v is None for v in ids.values()):
            raise ReportAdapterError(f"{TOKENIZER_FILE}: missing special tokens {SPECIALS}")
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        needed = projector.grid**2 + 1 + max_new_tokens
        if int(lm.config.n_positions) < needed:
            raise ReportAdapterError(
                f"the LM has {lm.config.n_positions} positions, the prefix and text need {needed}"
            )

    @property
    def prefix_length(self) -> int:
        return int(self.projector.grid**2)

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] ([BOS] text [EOS], padded) and their mask; text cut to fit."""
        rows = []
        for text in texts:
            ids = self.tokenizer.encode(text).ids[: self.max_new_tokens - 1]
            rows.append([self.bos_id, *ids, self.eos_id])
        t = max(len(r) for r in rows)
        ids_t = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids_t[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids_t, mask

    def _inputs(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([prefix, self.lm.get_input_embeddings()(ids)], dim=1)

    def loss(
        self, patches: torch.Tensor, hw: tuple[int, int], ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token cross-entropy on the text (not on the prefix, [BOS] or padding)."""
        prefix = self.projector(patches, hw)
        b, p = prefix.shape[:2]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100  # [BOS] is given, not predicted
        labels = torch.cat(
            [torch.full((b, p), -100, dtype=torch.long, device=ids.device), labels], 1
        )
        attention = torch.cat([torch.ones((b, p), dtype=mask.dtype, device=mask.device), mask], 1)
        out = self.lm(
            inputs_embeds=self._inputs(prefix, ids), attention_mask=attention, labels=labels
        )
        return out.loss  # type: ignore[no-any-return]

    @torch.no_grad()
    def generate(self, patches: torch.Tensor, hw: tuple[int, int]) -> list[str]:
        """Greedy text for each image's patch tokens [B, h*w, D] (at most max_new_tokens)."""
        device = next(self.lm.parameters()).device
        prefix = self.projector(patches.to(device, torch.float32), hw)
        b = prefix.shape[0]
        ids = torch.full((b, 1), self.bos_id, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        # key/value cache: transformers 5 names it `cache`, 4.x `past_key_values`
        cache_arg = (
            "cache"
            if "cache" in inspect.signature(self.lm.forward).parameters
            else "past_key_values"
        )
        out = self.lm(inputs_embeds=self._inputs(prefix, ids), use_cache=True)
        cache: Any = None
        for step in range(self.max_new_tokens):
            if step:
                out = self.lm(input_ids=ids[:, -1:], use_cache=True, **{cache_arg: cache})
            cache = out.get("cache")
            if cache is None:
                cache = out.get("past_key_values")
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        texts = []
        for row in ids[:, 1:].tolist():
            words = [t for t in row if t not in (self.pad_id, self.bos_id)]
            if self.eos_id in words:
                words = words[: words.index(self.eos_id)]
            texts.append(_detokenize(self.tokenizer.decode(words, skip_special_tokens=True)))
        return texts


def _detokenize(text: str) -> str:
    return re.sub(r"\s+([,.;:!?)])", r"\1", text).strip()


# --------------------------------------------------------------------------------------------
# files


def save_report_adapter(adapter: ReportAdapter, root: Path, **meta: Any) -> dict[str, Any]:
    """Write the adapter under ``root/adapters/report``; returns its manifest entry."""
    from workers.models.bundle import sha256_file
    from workers.models.files import atomic_save_safetensors

    rel = f"adapters/{REPORT_KIND}"
    folder = root / rel
    (folder / LM_DIR).mkdir(parents=True, exist_ok=True)
    adapter.lm.save_pretrained(str(folder / LM_DIR), safe_serialization=True)
    adapter.tokenizer.save(str(folder / TOKENIZER_FILE))
    atomic_save_safetensors(
        {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in adapter.projector.state_dict().items()
        },
        folder / PROJECTOR_FILE,
    )
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        "path": rel,
        "format": REPORT_FORMAT,
        "files": {str(p.relative_to(folder)): sha256_file(p) for p in files},
        "prefix_grid": adapter.projector.grid,
        "max_new_tokens": adapter.max_new_tokens,
        **meta,
    }


def report_files(root: Path, spec: dict[str, Any]) -> list[tuple[str, Path, str]]:
    """(label, path, expected sha256) of every file of the adapter entry ``spec``."""
    from workers.models.bundle import BundleError, _inside

    rel = spec.get("path")
    files = spec.get("files")
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise BundleError("manifest.json: adapters.report.path must be a relative folder")
    if not isinstance(files, dict) or not files:
        raise BundleError("manifest.json: adapters.report.files must list the adapter's files")
    for need in (f"{LM_DIR}/config.json", TOKENIZER_FILE, PROJECTOR_FILE):
        if need not in files:
            raise BundleError(f"manifest.json: adapters.report.files does not list {need}")
    folder = _inside(root, rel)
    return [(f"{rel}/{name}", _inside(folder, name), str(sha)) for name, sha in files.items()]


def load_report_adapter(root: Path, spec: dict[str, Any], hidden_size: int) -> ReportAdapter:
    """Load a checked report adapter (its checksums were verified by ``load_bundle``)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    from workers.models.bundle import _inside

    if spec.get("format", REPORT_FORMAT) != REPORT_FORMAT:
        raise ReportAdapterError(f"adapters.report.format must be {REPORT_FORMAT!r}")
    folder = _inside(root, str(spec["path"]))
    try:
        grid = int(spec.get("prefix_grid", 8))
        max_new = int(spec.get("max_new_tokens", 24))
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        lm = GPT2LMHeadModel.from_pretrained(str(folder / LM_DIR), local_files_only=True)
        projector = PrefixProjector(hidden_size, int(lm.config.n_embd), grid)
        state = load_file(str(folder / PROJECTOR_FILE), device="cpu")
        projector.load_state_dict(state, strict=True)
    except ReportAdapterError:
        raise
    except Exception as exc:  # tokenizer / transformers / safetensors / shape errors
        raise ReportAdapterError(f"adapter {spec['path']}: cannot load: {exc}") from exc
    adapter = ReportAdapter(projector, lm, tokenizer, max_new_tokens=max_new)
    adapter.eval()
    return adapter
