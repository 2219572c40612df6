"""Write tests/fixtures/tf_tiny_bert: a tiny random BERT saved by transformers 4.x ``TFBertModel.save_pretrained``.

Why a committed fixture: transformers 5 removed its TensorFlow models (no ``TFBertModel``, no ``from_tf``), so the
test environment cannot make a TensorFlow checkpoint itself. This script reproduces the committed files; it runs in a
throwaway virtual environment, never in the project's own::

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install 'transformers==4.57.*' tensorflow-cpu==2.21.0 tf-keras==2.21.0 numpy
    /tmp/tfvenv/bin/python scripts/make_tf_fixture.py tests/fixtures/tf_tiny_bert

(The committed fixture was made with Python 3.11, transformers 4.57.x, tensorflow-cpu 2.21.0, tf-keras 2.21.0;
``expected_outputs.json`` records the exact versions under ``generator``.)

What it writes into DIR:

* ``config.json`` + ``tf_model.h5``: ``TFBertModel(config)`` (vocab 120, hidden 32, 2 layers, 2 heads, intermediate
  37, 64 positions), built, then every weight (LayerNorm scales and biases included, which initialise to ones and
  zeros) overwritten with seeded random values, so that a weight mapped to the wrong place or left untransposed
  changes the outputs;
* ``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``: a WordPiece ``BertTokenizer``;
* ``expected_outputs.json``: the TensorFlow model's own ``last_hidden_state`` and ``pooler_output`` for three fixed
  batches (input ids, attention masks with padding, token type ids), and the tokenizer's ids for one sentence.
  It is not a Hugging Face file, so an import never takes it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers 4.x TF models run on tf-keras (Keras 2)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SEED = 1234
WORDS = (  # split in vocabulary()
    "the a of and to in is it that was for on are with as be at this have from or one had by word but not what all"
    " were we when your can said there use an each which she do how their if will up other about out many then them"
    " these so some her would make like him into time has look two more write go see hello world tensor flow model"
)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = [*"abcdefghijklmnopqrstuvwxyz", ".", ",", "!", "?"]
# three batches: (input_ids, attention_mask, token_type_ids); id 0 is [PAD], 2 [CLS], 3 [SEP]
BATCHES = [
    (
        [[2, 10, 55, 7, 99, 3], [2, 41, 3, 0, 0, 0]],
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]],
        [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]],
    ),
    (
        [[2, 5, 6, 8, 3], [2, 119, 118, 3, 0], [2, 60, 3, 0, 0]],
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]],
        [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]],
    ),
    (
        [[2, 17, 33, 64, 80, 101, 115, 3]],
        [[1, 1, 1, 1, 1, 1, 1, 1]],
        [[0, 0, 0, 0, 1, 1, 1, 1]],
    ),
]
SENTENCE = "Hello world, the tensor flow model!"


def vocabulary() -> list[str]:
    tokens = SPECIALS + WORDS.split() + LETTERS + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    tokens = list(dict.fromkeys(tokens))
    while len(tokens) < 120:
        tokens.append(f"[unused{len(tokens)}]")
    return tokens[:120]


def rounded(values: object) -> object:
    import numpy as np

    return np.round(np.asarray(values, dtype=np.float64), 7).tolist()


def main(out: Path) -> None:
    import h5py
    import keras
    import numpy as np
    import tensorflow as tf
    import tf_keras
    import transformers
    from transformers import BertConfig, BertTokenizer, TFBertModel

    tf.keras.utils.set_random_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = TFBertModel(config)
    model(model.dummy_inputs, training=False)  # build every weight
    rng = np.random.default_rng(SEED)
    for weight in model.weights:
        shape = tuple(weight.shape)
        values = rng.normal(0.0, 0.2, size=shape)
        if weight.name.endswith("gamma:0"):
            values = 1.0 + values
        weight.assign(values.astype(np.float32))
    model.save_pretrained(out)  # config.json + tf_model.h5 (HDF5, Keras 2 layout)

    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(vocabulary()) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True)
        tokenizer.save_pretrained(out)
    (out / "added_tokens.json").unlink(missing_ok=True)  # empty when nothing was added

    batches = []
    for ids, mask, types in BATCHES:
        result = model(
            input_ids=tf.constant(ids, dtype=tf.int32),
            attention_mask=tf.constant(mask, dtype=tf.int32),
            token_type_ids=tf.constant(types, dtype=tf.int32),
            training=False,
        )
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": types,
                "last_hidden_state": rounded(result.last_hidden_state.numpy()),
                "pooler_output": rounded(result.pooler_output.numpy()),
            }
        )
    expected = {
        "generator": {
            "script": "scripts/make_tf_fixture.py",
            "seed": SEED,
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tf_keras": tf_keras.__version__,
            "h5py": h5py.__version__,
            "numpy": np.__version__,
        },
        "tokenizer": {"text": SENTENCE, "input_ids": tokenizer(SENTENCE)["input_ids"]},
        "batches": batches,
    }
    (out / "expected_outputs.json").write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
    for path in sorted(out.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_tf_fixture.py OUT_DIR")
    main(Path(sys.argv[1]))
