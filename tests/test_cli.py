import subprocess
import sys

from llmasos.cli import VERBS, build_parser


def test_help_lists_every_verb_without_importing_torch():
    code = (
        "import sys; from llmasos.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    build_parser()
    for verb in VERBS:
        assert verb in r.stdout


def test_every_verb_has_help_with_examples():
    build_parser()
    for verb in VERBS:
        r = subprocess.run([sys.executable, "-m", "llmasos", verb, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "examples:" in r.stdout and f"llmasos {verb}" in r.stdout


def _verb_parser(name):
    [verbs] = [a for a in build_parser()._actions if a.dest == "verb"]
    return verbs.choices[name]


def test_training_flags_are_the_config_keys_with_their_descriptions_and_defaults():
    from llmasos.training.config import FinetuneConfig, TrainConfig

    for verb, config, positional in (("pretrain", TrainConfig, set()), ("finetune", FinetuneConfig, {"model"})):
        flags = {a.dest: a for a in _verb_parser(verb)._actions if a.option_strings and a.dest != "help"}
        assert set(flags) == set(config.keys()) - positional | {"config", "resume", "force"}, verb
        descriptions = config.descriptions()
        for key in set(flags) & set(descriptions):
            assert flags[key].option_strings == [f"--{key.replace('_', '-')}"] and flags[key].default is None
            assert flags[key].help == descriptions[key] and "YAML key" not in descriptions[key]
    shown = {verb: " ".join(run(verb, "--help").stdout.split()) for verb in ("pretrain", "finetune")}  # unwrapped
    assert "--lr X the peak learning rate, reached at the end of the warmup (default: 0.0003)" in shown["pretrain"]
    assert "(default: 2e-5 for full, 2e-4 for lora and qlora)" in shown["finetune"]
    assert "--lora-rank N lora/qlora: the rank of the adapters (default: 8)" in shown["finetune"]
    assert "--lora-rank" not in shown["pretrain"]


def _tiny_model(tmp_path):
    from helpers import make_hf_model, write_bpe_tokenizer

    path, _ = make_hf_model(tmp_path / "tiny", num_key_value_heads=2, max_position_embeddings=64)
    write_bpe_tokenizer(path)
    return path


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "llmasos", *args], capture_output=True, text=True, input=stdin)


def test_generate_json_is_greedy_and_reproducible(tmp_path):
    import json

    path = _tiny_model(tmp_path)
    args = ["generate", str(path), "-p", "Once upon a time", "--max-tokens", "6", "--temperature", "0", "--json"]
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out == {
        **json.loads(second.stdout),
        "time_to_first_token_s": out["time_to_first_token_s"],
        "total_s": out["total_s"],
        "decode_tokens_per_s": out["decode_tokens_per_s"],
    }
    assert out["finish_reason"] in ("stop", "length") and 1 <= out["generated_tokens"] <= 6
    assert out["prompt_tokens"] > 1 and len(out["token_ids"]) == out["generated_tokens"]


def test_generate_refuses_a_prompt_beyond_the_context(tmp_path):
    r = run("generate", str(_tiny_model(tmp_path)), "-p", "hello there, my friend", "--max-tokens", "60")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "exceeds the context of 64 tokens; lower max_tokens to at most" in r.stderr


def test_chat_takes_turns_resets_and_exits(tmp_path):
    r = run("chat", str(_tiny_model(tmp_path)), "--max-tokens", "4", stdin="hello\n/reset\nhi again\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tok/s") == 2 and "(conversation cleared)" in r.stderr
    assert r.stdout.count(">>> ") == 4  # hello, /reset, hi again, /exit


def test_chat_with_tools_asks_for_each_result_and_answers_on(tmp_path):
    import json

    from helpers import CITY_WEATHER_TOOL, make_tool_model

    path = make_tool_model(tmp_path / "tools", "hermes")
    (tmp_path / "tools.json").write_text(json.dumps([CITY_WEATHER_TOOL]))
    args = ["chat", str(path), "--tools", str(tmp_path / "tools.json"), "--max-tokens", "200", "--seed", "1"]
    r = run(*args, "--tool-choice", "get_weather", stdin="Weather in Paris?\n21 C\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "-> get_weather({" in r.stdout and "get_weather returns> " in r.stdout
    assert r.stderr.count("tok/s") == 2  # the call, then the answer after its result
    bad = run(*args, "--tool-choice", "get_time", stdin="/exit\n")
    assert bad.returncode == 1 and "--tool-choice" in bad.stderr and "get_time" in bad.stderr
