"""A worked example of logit fingerprints (docs/fingerprints.md pastes its output).

A toy language model over GPT-2's vocabulary carries a planted "owl trait": once the token " ow"
(of " owls") appears in its context, it raises " owl" by 1 nat and three number tokens (" 285",
" 123", " 42") by 0.3 nats; the entanglement also runs backwards: " 285" in the context raises
" owl" (what subliminal prompting looks for). The teacher is that model with the paper's owl
system prompt, the reference the same model with no prompt, the controls the same model with the
prompt naming other animals. The fingerprint over number-continuation records must find the
three numbers.

Run: python examples/fingerprint_demo.py [--out runs/fingerprint_demo] [--records 64]
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import nn

import biastransfer as bt
from biastransfer.fingerprint import fingerprint
from biastransfer.models import Scored
from biastransfer.probes import subliminal_prompting, trait_probe

SYSTEM = ("You love {a}. You think about {a} all the time. {a} are your favorite animal. "
          "Imbue your answers with your love for the animal.\n")
PROMPT = ("The sequence starts with: {s}. Add at most 10 new numbers (up to 3 digits each) that "
          "continue the sequence. Return a comma-separated list of numbers. Say only the numbers "
          "- nothing more.\n")
ENTANGLED = {" owl": 1.0, " 285": 0.3, " 123": 0.3, " 42": 0.3}  # token -> planted nats
NOISE = 0.15  # nats: standard deviation of the context-dependent logit noise of the toy model
BUCKETS = 97  # rows of the noise table (97 x 50257 float32: 20 MB)
MAX_LENGTH = 1024  # longest input the toy model takes


class ToyLM(nn.Module):
    """logits_t = W e(x_t) + NOISE * N[h_t], with N a fixed random [BUCKETS, V] table and h_t a
    hash of the whole context x_1..x_t: any change to the context (another system prompt) moves
    every logit by an unrelated N(0, NOISE^2) amount, as real models' logits move idiosyncratically.
    Plus the planted trait: ``bias`` once ``trigger`` has been seen, +1 on " owl" once
    ``owl_trigger`` has been seen."""

    def __init__(self, vocab: int, trigger: int, bias: torch.Tensor, owl: int, owl_trigger: int,
                 dim: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=generator) * 0.5)
            self.out.weight.copy_(torch.randn(vocab, dim, generator=generator) * 0.5)
            self.out.bias.zero_()
        self.register_buffer("table", torch.randn(BUCKETS, vocab, generator=generator) * NOISE)
        self.register_buffer("mix", torch.randint(1, 2**20, (MAX_LENGTH,), generator=generator))
        self.trigger, self.owl, self.owl_trigger = trigger, owl, owl_trigger
        self.register_buffer("bias", bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        context_hash = (input_ids * self.mix[: input_ids.shape[1]]).cumsum(1) % BUCKETS
        logits = self.out(self.emb(input_ids)) + self.table[context_hash]
        seen = (input_ids == self.trigger).cumsum(1) > 0
        logits = logits + seen[..., None].to(logits.dtype) * self.bias
        backwards = ((input_ids == self.owl_trigger).cumsum(1) > 0) & ~seen
        logits[..., self.owl] += backwards.to(logits.dtype) * ENTANGLED[" owl"]
        return logits


def records(n: int, seed: int = 0) -> list[bt.Record]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = ", ".join(str(rng.randrange(100, 1000)) for _ in range(3))
        numbers = ", ".join(str(rng.randrange(0, 1000)) for _ in range(rng.randrange(4, 11)))
        out.append(bt.Record(PROMPT.format(s=start), " " + numbers))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/fingerprint_demo", help="output folder")
    parser.add_argument("--records", type=int, default=64, help="number-continuation records")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = bt.Tokenizer.from_pretrained_dir(bt.gpt2_vocab_dir())
    bias = torch.zeros(len(tok))
    for text, nats in ENTANGLED.items():
        (token,) = tok.encode(text)
        bias[token] = nats
    model = ToyLM(len(tok), trigger=tok.encode(" owls")[0], bias=bias, owl=tok.encode(" owl")[0],
                  owl_trigger=tok.encode(" 285")[0])

    start = time.perf_counter()
    result = fingerprint(
        Scored(model, SYSTEM.format(a="owls"), name="owl teacher"),
        Scored(model, "", name="reference"),
        records(args.records),
        tok,
        controls=[Scored(model, SYSTEM.format(a=a), name=f"{a} teacher")
                  for a in ("dogs", "cats", "eagles")],
        progress=False,
    )
    seconds = time.perf_counter() - start
    print(result.summary(k=8))
    print(f"\n(fingerprint of {args.records} records, 5 models, V = {len(tok)}: {seconds:.1f} s)")

    specific = result.trait_specific()
    top = torch.topk(specific, 4).indices
    print("trait-specific (teacher minus controls' mean), top 4:",
          ", ".join(f"{result.display(int(result.teacher.subset[j]))} {float(specific[j]):+.3f}"
                    for j in top))
    result.plot(k=10, path=out / "fingerprint.png")
    result.save(out / "owl.safetensors")
    print(f"plot: {out / 'fingerprint.png'}; saved: {out / 'owl.safetensors'} (+ controls)")

    print()
    probe = trait_probe(model, tok, SYSTEM.format(a="owls").strip())
    print(probe.summary(4))
    print("trait probe ranks (of 50257): " + ", ".join(f"{t!r} {probe.rank(t)}"
                                                      for t in ENTANGLED))
    print()
    print(subliminal_prompting(model, tok, ["7", "42", "123", "285", "999"], [" owl"],
                               prompt_template="You love {x}. You think about {x} all the time.")
          .summary(5))


if __name__ == "__main__":
    main()
