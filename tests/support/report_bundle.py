"""A bundle with an UNTRAINED report-generation adapter, for tests of the real path.

The parent bundle (the DEMO one) plus ``adapters.report``: a word-level tokenizer over a few
sentences, a 2-layer GPT-2 and a prefix projector, all with seeded random weights (nothing is
trained, nothing downloaded), saved and pinned by checksum as ``pacs-agent adapters
train-report`` saves them. Its text is random words: the tests show where the text goes (the
SR, marked machine-generated and unverified), not what it says; tests/test_report_adapter.py
shows that a trained adapter says the right thing.

Whether an untrained LM writes anything at all is chance: its first greedy token may be
``[EOS]`` (and an empty text is rightly not written). The special tokens' rows of the LM's tied
input/output embedding are zeroed, so their logits are 0 while the words' are random: with
this many words one of them wins each step, and the adapter writes ``max_new_tokens`` words.
"""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "no acute cardiopulmonary abnormality",
    "the lungs are clear without focal consolidation, effusion or pneumothorax",
    "heart size is within normal limits",
    "small left pleural effusion with adjacent atelectasis",
    "bright disc in the upper left, large",
]


def write_untrained_report_bundle(parent: Path, out: Path, *, seed: int = 0) -> Path:
    """``parent`` + an untrained report adapter, written to ``out`` (see the module notes)."""
    import torch

    from workers.models.bundle import read_manifest, write_derived_bundle
    from workers.models.report_adapter import (
        REPORT_KIND,
        SPECIALS,
        PrefixProjector,
        ReportAdapter,
        build_tokenizer,
        new_language_model,
        save_report_adapter,
    )

    root, manifest, _ = read_manifest(parent)
    encoder = root / manifest["encoder"]["path"] / "config.json"
    hidden = int(json.loads(encoder.read_text())["hidden_size"])
    grid, max_new, width = 4, 12, 64
    tokenizer = build_tokenizer(SENTENCES)
    lm = new_language_model(
        tokenizer.get_vocab_size(), grid**2 + max_new + 8, n_embd=width, n_layer=2, seed=seed
    )
    with torch.no_grad():
        for token in SPECIALS:
            lm.get_input_embeddings().weight[tokenizer.token_to_id(token)] = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = PrefixProjector(hidden, width, grid)
    adapter = ReportAdapter(projector, lm, tokenizer, max_new_tokens=max_new)
    spec = save_report_adapter(
        adapter,
        out,
        lm_config={"type": "gpt2", "n_layer": 2, "n_embd": width},
        trained_on="UNTRAINED: random weights (test bundle)",
    )
    return write_derived_bundle(
        parent,
        out,
        new_adapters={REPORT_KIND: spec},
        updates={
            "name": f"{manifest.get('name', 'bundle')} + untrained report adapter",
            "version": f"{manifest.get('version', '0')}+report-untrained",
        },
        mode="link",
    )
