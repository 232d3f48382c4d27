"""Reading and writing model weights, in layers: each module imports only the ones listed below it.

    store.py       the local store: `pull` (copy, convert or download a checkpoint into it); re-exports `resolve`
    export.py      `export_hf`, `export_gguf`: any model we read, as an HF dir or a GGUF file (+ Ollama Modelfile)
    onnx.py        `export_onnx`: the decoder with its KV cache, for onnxruntime
    gguf_vocab.py  a GGUF's vocabulary <-> tokenizer files; `tokenizer_source`: where a model's tokenizer is
    load.py        `load_model`, `open_checkpoint`: a `Transformer` from any format, or a LoRA adapter dir
    hf.py, meta.py, gguf.py
                   format codecs: read (and, but Meta, write) one format's files, nothing more
                   (gguf.py borrows meta.py's rotary permutations)
    paths.py       what a MODEL argument names: a path, or a model in the store (`resolve`)
    weights.py     tensors in safetensors and pickle files, read one at a time
    ollama.py      an Ollama `Modelfile`

Beneath them all: `llmasos.outputs` (`home`, `read_json`, `atomic_dir`), `llmasos.tokenization` (which
imports nothing of this package: whoever opens a `.gguf` passes `tokenizer_source`'s dir to `Tokenizer`)
and `llmasos.models`.
"""
