"""Build the built-in model ``hpcai-async/tiny-qwen3``: corpus, tokenizer, pre-training, shipped files.

    python scripts/build_builtin.py                          # hpcai_async/server/builtin/, ~5 min on 2 cores
    python scripts/build_builtin.py --steps 20 --out /tmp/x  # a quick smoke build

Everything is deterministic (fixed seeds, no downloads): the corpus is generated below from hand-written word
lists and fact tables, the byte-level BPE tokenizer is trained on it with ``tokenizers``, and a tiny
``Qwen3ForCausalLM`` is pre-trained on it on the CPU.

Prompt formats the model was trained on (reuse them in examples and tests)
-------------------------------------------------------------------------

Documents are separated by ``<|endoftext|>``; there is no BOS token. Every line ends with ``\\n``.

1. Plain sentences, e.g. ``The small cat sat on the red mat.`` and short paragraphs of them.
2. Question/answer pairs about simple facts, one pair per two lines::

       Q: What color is the sky?\\nA: blue\\n
       Q: What is the capital of France?\\nA: Paris\\n
       Q: What sound does a dog make?\\nA: woof\\n
       Q: What is the opposite of hot?\\nA: cold\\n
       Q: How many legs does a spider have?\\nA: eight\\n
       Q: What day comes after Monday?\\nA: Tuesday\\n
       Q: What is the plural of mouse?\\nA: mice\\n

   Prompt with ``"Q: <question>\\nA:"`` and sample with ``stop=["\\n"]``; the answer is the text after ``A:``
   (it starts with a space).
3. Sums of two whole numbers 0..20, always correct, in two forms::

       Q: What is 3+4?\\nA: 7\\n
       3+4=7\\n

   GRPO prompt: ``"Q: What is {a}+{b}?\nA:"``, ``stop=["\n"]``, reward = (first integer in the answer ==
   a+b). About 40% of the 441 pairs (``held_out_sum``) appear only in the bare ``a+b=c`` form, never as a
   question, so the model knows them but answers them right as a question only about a quarter of the time
   (greedy; the others all right): a GRPO run has room to improve. ``build_info.json`` records the numbers.

For SFT examples: the made-up words in ``RESERVED_WORDS`` (blicket, dax, wug, …) never occur in the corpus, so
``Q: What color is a blicket?\\nA: green`` is a fact the model can only learn from fine-tuning; it already
knows the question format and the colour words.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "hpcai_async" / "server" / "builtin"

SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..3
SEQ_LEN = 128
BATCH = 32
STEPS = 800
LR = 3e-3
MAX_POSITIONS = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Never in the corpus: SFT examples teach facts about these (checked at build time).
RESERVED_WORDS = [
    "blicket", "dax", "wug", "zorp", "fep", "toma", "kiki", "bouba", "glorp", "snib", "quib", "vorn",
    "mib", "tupa", "lorp", "nerf", "yeeb", "plim",
]  # fmt: skip

# --------------------------------------------------------------------------------------------- facts

COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
    "a banana": "yellow", "an orange": "orange", "a lemon": "yellow", "a tomato": "red", "the sun": "yellow",
    "milk": "white", "a carrot": "orange", "a frog": "green", "a crow": "black", "a plum": "purple",
    "a rose": "red", "the sea": "blue", "chocolate": "brown", "a pumpkin": "orange", "a leaf": "green",
    "an elephant": "gray", "a cloud": "white", "ash": "gray", "a strawberry": "red", "a grape": "purple",
    "a pig": "pink", "a flamingo": "pink", "soil": "brown", "a lime": "green", "a cherry": "red",
    "a violet": "purple", "a polar bear": "white", "a raven": "black", "a mouse": "gray", "a bear": "brown",
    "a fire truck": "red", "an emerald": "green", "a sapphire": "blue", "a ruby": "red", "gold": "yellow",
}  # fmt: skip
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "England": "London", "Russia": "Moscow", "China": "Beijing", "Canada": "Ottawa",
    "Greece": "Athens", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Cuba": "Havana", "Chile": "Santiago",
}  # fmt: skip
SOUNDS = {
    "a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa", "a pig": "oink",
    "a horse": "neigh", "an owl": "hoot", "a lion": "roar", "a bee": "buzz", "a snake": "hiss",
    "a frog": "ribbit", "a mouse": "squeak", "a crow": "caw", "a goat": "bleat", "a wolf": "howl",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "old": "new",
    "happy": "sad", "light": "dark", "open": "closed", "wet": "dry", "early": "late", "left": "right",
    "full": "empty", "high": "low", "hard": "soft", "loud": "quiet", "long": "short", "rich": "poor",
    "thick": "thin", "strong": "weak", "near": "far", "clean": "dirty", "good": "bad", "first": "last",
}  # fmt: skip
LEGS = {
    "a spider": "eight", "a dog": "four", "a cat": "four", "a bird": "two", "an ant": "six",
    "a person": "two", "a snake": "zero", "a horse": "four", "a bee": "six", "a chicken": "two",
    "a cow": "four", "a fish": "zero", "a duck": "two", "a beetle": "six", "a crab": "ten", "a frog": "four",
}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "goose": "geese", "cat": "cats", "dog": "dogs", "box": "boxes", "city": "cities", "leaf": "leaves",
    "knife": "knives", "sheep": "sheep", "fish": "fish", "bus": "buses", "baby": "babies", "wolf": "wolves",
}  # fmt: skip

# --------------------------------------------------------------------------------------------- sentences

NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Ivy",
    "Jack",
    "Lily",
    "Max",
    "Mia",
    "Noah",
    "Olivia",
    "Sam",
    "Tom",
    "Zoe",
]
NOUNS = ["cat", "dog", "bird", "horse", "fox", "rabbit", "boy", "girl", "man", "woman", "child", "teacher",
         "farmer", "baker", "king", "queen", "duck", "mouse", "bear", "frog"]  # fmt: skip
THINGS = [
    "ball",
    "book",
    "cup",
    "hat",
    "box",
    "kite",
    "apple",
    "cake",
    "letter",
    "key",
    "lamp",
    "bell",
    "map",
    "coat",
    "basket",
    "stone",
    "flower",
    "song",
    "boat",
    "drum",
]
ADJS = ["small", "big", "old", "young", "happy", "sad", "red", "blue", "green", "quiet", "loud", "little",
        "brave", "kind", "clever", "tired", "hungry", "warm", "cold", "bright"]  # fmt: skip
PLACES = ["park", "garden", "river", "forest", "market", "school", "house", "hill", "beach", "farm", "lake",
          "village", "city", "kitchen", "library", "field"]  # fmt: skip
VERBS_PAST = ["sat", "slept", "played", "waited", "danced", "sang", "walked", "ran", "read", "rested"]
VERBS_T = ["found", "saw", "liked", "took", "made", "lost", "carried", "painted", "bought", "gave away"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "quiet"]
ACTIVITIES = [
    "stayed at home",
    "went for a walk",
    "read a book",
    "played outside",
    "baked a cake",
    "visited a friend",
    "went to the market",
    "sat by the fire",
    "wrote a letter",
    "sang a song",
]
TIMES = ["In the morning", "At noon", "In the evening", "At night", "One day", "Later", "After lunch", "Then"]

STORIES = [
    "Once upon a time there was a small fox who lived in the forest. Every morning the fox walked to the "
    "river to drink.",
    "One day the fox found a shiny stone by the water. The fox carried the stone home and kept it under a"
    " leaf.",
    "Anna likes to read. She goes to the library every week and takes home three books. Her favorite "
    "books are about the sea, the stars and old kings.",
    "The farmer wakes up early. He feeds the cows, the pigs and the chickens. Then he drinks a cup of "
    "warm milk and works in the field until the sun goes down.",
    "Tom and Sam built a boat out of an old box. They painted it blue and took it to the lake. The boat "
    "did not sink, and the two friends laughed all afternoon.",
    "The baker makes bread before the sun rises. The whole village smells of warm bread. Children stop by"
    " the shop on their way to school.",
    "It was a cold winter night. Snow covered the hills and the roads. Inside the house the family sat by"
    " the fire and told stories until they fell asleep.",
    "Max has a little dog called Pip. Pip likes to chase the ball in the park. When Pip is tired he "
    "sleeps on the big red chair.",
    "In the spring the garden is full of flowers. There are red roses, yellow tulips and white daisies. "
    "Bees fly from flower to flower all day.",
    "A good friend listens, helps and shares. Grace shared her cake with Ivy, and Ivy gave Grace a flower"
    " from her garden.",
    "The river runs from the hills to the sea. Fish swim in it, birds drink from it, and the people of "
    "the village wash their clothes in it.",
    "Numbers help us count. One and one make two. Two and two make four. We can add numbers to find how "
    "many things there are in all.",
]


def held_out_sum(a: int, b: int) -> bool:
    """Sum pairs that appear only in the bare ``a+b=c`` form, never as ``Q: What is a+b?`` (about 40%)."""
    return (37 * a + 91 * b) % 10 < 4


def fact_pairs() -> list[tuple[str, str]]:
    """Every (question, answer) fact of the corpus."""
    qa: list[tuple[str, str]] = []
    qa += [(f"What color is {k}?", v) for k, v in COLORS.items()]
    qa += [(f"What is the capital of {k}?", v) for k, v in CAPITALS.items()]
    qa += [(f"What sound does {k} make?", v) for k, v in SOUNDS.items()]
    qa += [(f"What is the opposite of {k}?", v) for k, v in OPPOSITES.items()]
    qa += [(f"How many legs does {k} have?", v) for k, v in LEGS.items()]
    qa += [(f"What day comes after {d}?", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    qa += [(f"What month comes after {m}?", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    qa += [(f"What is the plural of {k}?", v) for k, v in PLURALS.items()]
    return qa


def fact_statements() -> list[str]:
    """The same facts as plain sentences."""
    out: list[str] = []
    out += [f"{k[0].upper()}{k[1:]} is {v}." for k, v in COLORS.items()]
    out += [f"The capital of {k} is {v}." for k, v in CAPITALS.items()]
    out += [f"{k[0].upper()}{k[1:]} says {v}." for k, v in SOUNDS.items()]
    out += [f"The opposite of {k} is {v}." for k, v in OPPOSITES.items()]
    out += [f"{k[0].upper()}{k[1:]} has {v} legs." for k, v in LEGS.items()]
    out += [f"After {d} comes {DAYS[(i + 1) % 7]}." for i, d in enumerate(DAYS)]
    out += [f"After {m} comes {MONTHS[(i + 1) % 12]}." for i, m in enumerate(MONTHS)]
    out += [f"One {k}, two {v}." for k, v in PLURALS.items()]
    return out


def sentence(rng: random.Random) -> str:
    c = rng.choice
    forms = [
        lambda: f"The {c(ADJS)} {c(NOUNS)} {c(VERBS_PAST)} in the {c(PLACES)}.",
        lambda: f"{c(NAMES)} {c(VERBS_T)} a {c(ADJS)} {c(THINGS)}.",
        lambda: f"{c(NAMES)} went to the {c(PLACES)} with {c(NAMES)}.",
        lambda: f"It was a {c(WEATHER)} day, so {c(NAMES)} {c(ACTIVITIES)}.",
        lambda: f"{c(TIMES)}, the {c(NOUNS)} {c(VERBS_T)} a {c(THINGS)} near the {c(PLACES)}.",
        lambda: f"The {c(NOUNS)} is {c(ADJS)} and the {c(NOUNS)} is {c(ADJS)}.",
        lambda: f"{c(NAMES)} has a {c(ADJS)} {c(THINGS)} and a {c(ADJS)} {c(THINGS)}.",
        lambda: f"{c(TIMES)}, {c(NAMES)} {c(ACTIVITIES)}.",
        lambda: f"There is a {c(THINGS)} in the {c(PLACES)}.",
        lambda: f"The {c(NOUNS)} and the {c(NOUNS)} {c(VERBS_PAST)} together.",
    ]
    return c(forms)()


def build_corpus(n_docs: int, seed: int = SEED) -> list[str]:
    """The pre-training documents (deterministic for a given seed)."""
    rng = random.Random(seed)
    facts = fact_pairs()
    statements = fact_statements()
    all_sums = [(a, b) for a in range(21) for b in range(21)]
    sums = [(a, b) for a, b in all_sums if not held_out_sum(a, b)]
    stories = STORIES
    docs: list[str] = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.25:  # a paragraph of sentences, with a fact statement now and then
            parts = [
                sentence(rng) if rng.random() < 0.8 else rng.choice(statements)
                for _ in range(rng.randint(2, 6))
            ]
            docs.append(" ".join(parts) + "\n")
        elif kind < 0.30:
            docs.append(rng.choice(stories) + "\n")
        elif kind < 0.60:  # fact Q/A, sometimes with a sum question mixed in
            lines = []
            for _ in range(rng.randint(1, 5)):
                if rng.random() < 0.2:
                    a, b = rng.choice(sums)
                    lines.append(f"Q: What is {a}+{b}?\nA: {a + b}\n")
                else:
                    q, a_ = rng.choice(facts)
                    lines.append(f"Q: {q}\nA: {a_}\n")
            docs.append("".join(lines))
        elif kind < 0.85:  # sum Q/A
            lines = []
            for _ in range(rng.randint(1, 6)):
                a, b = rng.choice(sums)
                lines.append(f"Q: What is {a}+{b}?\nA: {a + b}\n")
            docs.append("".join(lines))
        else:  # bare sums
            lines = []
            for _ in range(rng.randint(2, 10)):
                a, b = rng.choice(all_sums)
                lines.append(f"{a}+{b}={a + b}\n")
            docs.append("".join(lines))
    words = set(re.findall(r"[a-z]+", "\n".join(docs).lower()))
    leaked = words.intersection(RESERVED_WORDS)
    assert not leaked, f"reserved words leaked into the corpus: {sorted(leaked)}"
    return docs


# --------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(docs: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    # Written by hand (not save_pretrained) so transformers 4.x and 5.x both read it as a fast tokenizer.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- model


def model_config(vocab_size: int, eos_id: int, pad_id: int):  # type: ignore[no-untyped-def]
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
        architectures=["Qwen3ForCausalLM"],
    )


def pretrain(docs: list[str], out: Path, steps: int, threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(out))
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    n_blocks = (len(stream) - 1) // SEQ_LEN
    print(f"corpus: {len(docs)} docs, {len(stream)} tokens, {n_blocks} blocks of {SEQ_LEN}")

    model = Qwen3ForCausalLM(model_config(len(tok), eos, tok.pad_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return LR * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(SEED)
    model.train()
    t0 = time.perf_counter()
    ema = None
    for step in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=gen)
        batch = torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {ema:.3f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)
    print(f"trained in {time.perf_counter() - t0:.0f}s")
    return {"final_loss_ema": round(float(ema or 0.0), 4)}


def evaluate(out: Path) -> dict[str, float]:
    """Greedy accuracy on sums (seen and held out) and on the fact questions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok.padding_side = "left"

    def answers(prompts: list[str]) -> list[str]:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [t.split("\n")[0].strip() for t in texts]

    seen, held = [], []
    pairs = [(a, b) for a in range(21) for b in range(21)]
    got = answers([f"Q: What is {a}+{b}?\nA:" for a, b in pairs])
    for (a, b), ans in zip(pairs, got, strict=True):
        (held if held_out_sum(a, b) else seen).append(ans == str(a + b))
    facts = fact_pairs()
    got = answers([f"Q: {q}\nA:" for q, _ in facts])
    fact_acc = sum(g == a for g, (_, a) in zip(got, facts, strict=True)) / len(facts)
    return {
        "sum_accuracy_seen": sum(seen) / len(seen),
        "sum_accuracy_held_out": sum(held) / len(held),
        "fact_accuracy": fact_acc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--docs", type=int, default=30000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    docs = build_corpus(args.docs)
    build_tokenizer(docs, out)
    stats = pretrain(docs, out, args.steps, args.threads)
    stats.update(evaluate(out))
    info = {"seed": SEED, "steps": args.steps, "docs": args.docs, "batch": BATCH, "seq_len": SEQ_LEN, **stats}
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
