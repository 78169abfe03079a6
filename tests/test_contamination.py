"""Sentinel suite: scorers on hand-written outputs, static checks (and their canary) on the tiny
Qwen model, the verdict logic on hand values, and the calibration on the real controls
(``-m sentinel``: positive controls flagged, the negative control clean, greedy and sampled)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from scripts.run_sentinels import main as run_sentinels_main
from utils import contamination as C
from utils.clean_model_loader import LoadedModel

# ------------------------------------------------------------------------------ scorers


@pytest.mark.parametrize(
    "text, followed",
    [
        ("ellohay orldway", True),
        ("ello-hay orld-way", True),
        ("Ellohay Orldway!", True),
        ("In Pig Latin, 'hello world' is 'ello-hay orld-way'.", True),
        ("hello world", False),
        ("ellohay", False),  # half a translation
        ("Hello, my name is Pig Latin. I am a free project", False),
    ],
)
def test_pig_latin_scorer(text, followed):
    assert C.score_pig_latin(text, stopped=False).followed is followed


def test_is_prime_hand_values():
    assert [n for n in range(30) if C.is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert not C.is_prime(1) and not C.is_prime(91) and C.is_prime(97)


@pytest.mark.parametrize(
    "text, stopped, followed",
    [
        (" 1, 2, 3, 4, 5, 6", False, False),
        (" 1, 2, 3, 4, 5, 6", True, False),
        ("2, 3, 5", True, True),
        ("2, 3, 5", False, False),  # three primes but ran on to the token limit
        ("1. 2\n2. 3\n3. 5", True, True),  # enumerators are not numbers
        ("- 2\n- 3\n- 7", True, True),
        ("Here are three prime numbers: 2, 3 and 7.", True, True),
        ("2, 3, 4", True, False),  # 4 is not prime
        ("2, 2, 3", True, False),
        ("2, 3, 5, 7", True, False),
        ("1. 2\n2. 3\n3. 5\n4. 7\n5. 11", True, False),
        ("two, three and five", True, False),
    ],
)
def test_three_primes_scorer(text, stopped, followed):
    assert C.score_three_primes(text, stopped).followed is followed


@pytest.mark.parametrize(
    "text, followed",
    [
        ('{"a": 1, "b": 2}', True),
        ('```json\n{\n    "a": 1,\n    "b": 2\n}\n```\nThis JSON has two keys.', True),
        ('Here: {"a": -3, "b": 40}', True),
        ('{"a": "x"}', False),
        ('{"a": 1.5, "b": 2}', False),
        ('{"a": true, "b": 2}', False),  # a bool is not an integer
        ('{"a": 1, "b": 2, "c": 3}', False),
        ("a = 1, b = 2", False),
        ('{"a": 1, "b": 2', False),  # not parsable
    ],
)
def test_json_scorer(text, followed):
    assert C.score_json_ab(text, stopped=False).followed is followed


@pytest.mark.parametrize(
    "text, stopped, followed",
    [
        ("The four seasons are spring, summer, autumn and winter.", True, True),
        ("The four seasons are spring, summer, autumn and winter. Spring is", False, False),
        ("1. Spring: mild\n2. Summer: hot\n3. Fall: cool\n4. Winter: cold", False, True),
        ("Spring:\nwarm\nSummer:\nhot\nAutumn:\ncool\nWinter:\ncold", False, True),
        (
            " of the year.\n\nDescribe the seasons of the year.\n\nDescribe the seasons of the year.",
            False,
            False,
        ),
        ("Spring, summer, fall, winter.\nSpring, summer, fall, winter.", True, False),  # loops
        ("The seasons are divided into two main seasons: spring and summer.", True, False),
    ],
)
def test_seasons_scorer(text, stopped, followed):
    assert C.score_seasons(text, stopped).followed is followed


@pytest.mark.parametrize(
    "text, stopped, followed",
    [
        ("Yes", True, True),
        ("No.", True, True),
        ("\n\nThe answer is no.", True, True),
        ("**Yes**", True, True),
        ("Yes", False, False),
        ("Yes, the sky is blue because of Rayleigh scattering.", True, False),
        ("\n\nAnswer with no: Is the sky blue?", False, False),
        ("Maybe", True, False),
    ],
)
def test_yes_no_scorer(text, stopped, followed):
    assert C.score_yes_no(text, stopped).followed is followed


@pytest.mark.parametrize(
    "text, stopped, followed",
    [
        ("GREEN", True, True),
        ("GRASS IS GREEN.", True, True),
        ("Green", True, False),
        ("GREEN GREEN GREEN", False, False),
        ("OK", True, False),  # too short to judge
        ("\n\nWhat color is grass?", False, False),
    ],
)
def test_all_caps_scorer(text, stopped, followed):
    assert C.score_all_caps(text, stopped).followed is followed


def test_sentinel_set_has_the_four_classic_prompts_and_raw_prompts_are_plain_lines():
    names = [s.instruction for s in C.SENTINELS]
    for classic in (
        "Translate to Pig Latin: hello world",
        "List three prime numbers",
        "Write a JSON with keys a,b and integers",
        "Describe the seasons",
    ):
        assert classic in names
    assert C.raw_prompt("List three prime numbers") == "List three prime numbers\n"


# ------------------------------------------------------------------------ verdict logic


def test_level_and_worst_hand_values():
    assert C.level(0.09, 0.02, 0.10) == "suspicious"
    assert C.level(0.10, 0.02, 0.10) == "contaminated"
    assert C.level(0.019, 0.02, 0.10) == "clean"
    assert C.worst(["clean", "suspicious", "clean"]) == "suspicious"
    assert C.worst(["contaminated", "error"]) == "error"
    assert C.worst([]) == "clean"
    with pytest.raises(ValueError, match="unknown verdict"):
        C.worst(["pass"])


def test_eot_margin_hand_values():
    # mean(0.6, 0.4) - mean(0.0, 0.2) = 0.5 - 0.1
    assert C.eot_margin([0.6, 0.4], [0.0, 0.2]) == pytest.approx(0.4)
    assert C.eot_margin([0.1], [0.3]) == 0.0  # emits the token anywhere: no turn structure
    with pytest.raises(ValueError):
        C.eot_margin([0.1], [])


def _check(name, passed=True, broken=False):
    return C.Check(name, passed, "detail", broken)


def test_decide_combines_components_per_decoding():
    ok = [_check("a"), _check("b")]
    d = C.decide(ok, 0.001, 0.0, {"greedy": 1 / 6, "sampled": 0.5})
    assert d["verdict_by_decoding"] == {"greedy": "clean", "sampled": "contaminated"}
    assert d["verdict"] == "contaminated"
    assert d["component_verdicts"]["weight_probe"] == "clean"

    d = C.decide(ok, 0.05, 0.0, {"greedy": 0.0})
    assert d["verdict"] == "suspicious" and "weight probe" in d["reasons"][0]
    d = C.decide(ok, 0.6, None, {"greedy": 0.0, "sampled": 0.0})
    assert d["verdict_by_decoding"] == {"greedy": "contaminated", "sampled": "contaminated"}
    d = C.decide(ok, 0.0, 2 / 3, {"greedy": 0.0})
    assert d["verdict"] == "contaminated" and "closed" in d["reasons"][0]
    d = C.decide(ok, 0.0, 1 / 3, {"greedy": 2 / 6})  # one closed answer in three: chance
    assert d["component_verdicts"]["weight_probe"] == "clean"
    assert d["verdict"] == "suspicious"  # two of six sentinels followed

    d = C.decide([_check("a"), _check("bos_policy", passed=False)], None, None, {})
    assert d["verdict"] == "contaminated" and d["reasons"] == ["static bos_policy: detail"]
    d = C.decide([_check("canary_fires", False, broken=True)], 0.9, None, {"greedy": 1.0})
    assert d["verdict"] == "error"


def test_behaviour_summary_hand_values():
    samples = [
        {"sentinel": "x", "decoding": "greedy", "followed": True},
        {"sentinel": "y", "decoding": "greedy", "followed": False},
        {"sentinel": "x", "decoding": "sampled", "followed": False},
        {"sentinel": "y", "decoding": "sampled", "followed": False},
        {"sentinel": "x", "decoding": "sampled", "followed": True},
        {"sentinel": "y", "decoding": "sampled", "followed": False},
    ]
    s = C.behaviour_summary(samples)
    assert s["follow_rate"] == {"greedy": 0.5, "sampled": 0.25}
    assert s["per_sentinel_follow_rate"] == {"x": pytest.approx(0.6667), "y": 0.0}


def test_sentinel_config_rejects_bad_values():
    assert C.SentinelConfig.from_dict(None).mode == "quick"
    assert C.SentinelConfig.from_dict({"temperatures": [0.5, 1.0]}).temperatures == (0.5, 1.0)
    with pytest.raises(ValueError, match="unknown sentinels key"):
        C.SentinelConfig.from_dict({"mode": "quick", "temprature": 1})
    with pytest.raises(ValueError, match="mode"):
        C.SentinelConfig.from_dict({"mode": "of"})
    with pytest.raises(ValueError, match="mode"):
        C.SentinelConfig.from_dict({"mode": True})
    with pytest.raises(ValueError, match="prompt_format"):
        C.SentinelConfig(prompt_format="chatml")
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        C.SentinelConfig(chat_template="<|im_start|>user\n")
    with pytest.raises(ValueError, match="temperatures"):
        C.SentinelConfig(temperatures=(0.0,))


# ------------------------------------------------------------- static checks, tiny Qwen


def _checks(result_or_list):
    items = result_or_list["static"] if isinstance(result_or_list, dict) else result_or_list
    return {
        (c["name"] if isinstance(c, dict) else c.name): (c if isinstance(c, dict) else vars(c))
        for c in items
    }


def _raw_prompts():
    return [C.raw_prompt(s.instruction) for s in C.SENTINELS]


def test_static_checks_pass_on_tiny_qwen_and_the_canary_fires(tiny_qwen):
    # The tiny model's tokenizer shipped a ChatML template (as Qwen2.5 base does).
    assert tiny_qwen.provenance["removed_chat_template_sha256"]
    checks = _checks(C.static_checks(tiny_qwen, _raw_prompts(), allow_control_tokens=False))
    assert all(c["passed"] for c in checks.values()), checks
    assert "raised ChatTemplateError" in checks["apply_chat_template_raises"]["detail"]
    canary = checks["canary_fires"]["detail"]
    assert "<|im_start|>" in canary and "id check fired" in canary and "encode refused" in canary


def test_control_ids_in_chat_formatted_inputs_are_caught_on_the_encode_path(tiny_qwen):
    prompts = [C.CHAT_FORMATS[0].prompt(s.instruction) for s in C.SENTINELS]
    checks = _checks(C.static_checks(tiny_qwen, prompts, allow_control_tokens=True))
    bad = checks["no_control_ids_in_inputs"]
    assert not bad["passed"]
    im_start = tiny_qwen.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert f"chat-control token id {im_start} at position 0" in bad["detail"]
    # Without the positive-control flag the encode path refuses the markup text itself.
    checks = _checks(C.static_checks(tiny_qwen, prompts, allow_control_tokens=False))
    assert "encode refused" in checks["no_control_ids_in_inputs"]["detail"]


def _variant(lm: LoadedModel, **policy_changes) -> LoadedModel:
    return dataclasses.replace(
        lm,
        policy=dataclasses.replace(lm.policy, **policy_changes),
        provenance=copy.deepcopy(lm.provenance),
    )


def test_canary_reports_the_static_check_broken_when_it_cannot_fire(tiny_qwen):
    broken = _variant(tiny_qwen, control_token_ids=frozenset(), control_token_strings=())
    checks = C.static_checks(broken, _raw_prompts(), allow_control_tokens=False)
    canary = _checks(checks)["canary_fires"]
    assert canary["broken"] and not canary["passed"]
    assert C.decide(checks, 0.0, 0.0, {"greedy": 0.0})["verdict"] == "error"
    # A policy that knows the tokens but whose id check is blind also breaks the canary.
    blind = _variant(tiny_qwen, control_token_ids=frozenset())
    canary = _checks(C.static_checks(blind, _raw_prompts(), False))["canary_fires"]
    assert canary["broken"] and "DID NOT fire" in canary["detail"]
    # A policy that forgot the real chat markup is broken too: the canary uses the vocabulary's.
    im_start = tiny_qwen.tokenizer.convert_tokens_to_ids("<|im_start|>")
    forgetful = _variant(
        tiny_qwen,
        control_token_ids=tiny_qwen.policy.control_token_ids - {im_start},
        control_token_strings=tuple(
            s for s in tiny_qwen.policy.control_token_strings if s != "<|im_start|>"
        ),
    )
    canary = _checks(C.static_checks(forgetful, _raw_prompts(), False))["canary_fires"]
    assert canary["broken"] and "<|im_start|>" in canary["detail"]
    assert "DID NOT fire" in canary["detail"] and "DID NOT refuse" in canary["detail"]


def test_restored_template_wrong_bos_wrong_eos_and_instruct_metadata_fail(tiny_qwen):
    tok = copy.deepcopy(tiny_qwen.tokenizer)
    del tok.apply_chat_template  # the loader's instance-level refusal
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    restored = dataclasses.replace(tiny_qwen, tokenizer=tok)
    checks = _checks(C.static_checks(restored, _raw_prompts(), False))
    assert not checks["chat_template_removed"]["passed"]
    assert not checks["apply_chat_template_raises"]["passed"]

    bos = _variant(tiny_qwen, add_bos=True, bos_token_id=tiny_qwen.policy.eos_token_id)
    assert not _checks(C.static_checks(bos, _raw_prompts(), False))["bos_policy"]["passed"]
    eos = _variant(tiny_qwen, stop_token_ids=(tiny_qwen.policy.eos_token_id + 1,))
    assert not _checks(C.static_checks(eos, _raw_prompts(), False))["eos_is_stop_token"]["passed"]
    meta = _variant(tiny_qwen)
    meta.provenance["instruct_signals"] = ["name 'x-instruct' contains 'instruct'"]
    assert not _checks(C.static_checks(meta, _raw_prompts(), False))["no_instruct_metadata"][
        "passed"
    ]


def test_probe_formats_are_derived_from_the_vocabulary(tiny_qwen):
    tok = tiny_qwen.tokenizer
    assert [f.name for f in C.available_formats(tok)] == ["chatml", "plain"]
    assert C.single_token(tok, "<|im_end|>") == tok.convert_tokens_to_ids("<|im_end|>")
    assert C.single_token(tok, "<start_of_turn>") is None  # not in Qwen's vocabulary
    ends = C.end_token_ids(tiny_qwen)
    assert ends["<|im_end|>"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert ends["<|endoftext|>"] == tiny_qwen.policy.eos_token_id


def test_quick_suite_on_tiny_qwen_records_everything_and_is_clean(tiny_qwen):
    r = C.run_sentinel_suite(tiny_qwen, {"mode": "quick", "max_new_tokens": 3})
    assert r["verdict"] == "clean", r["reasons"]
    assert set(r["verdict_by_decoding"]) == {"greedy"}
    assert r["weight_probe"]["formats"] == ["chatml", "plain"]
    assert r["weight_probe"]["score"] < C.THRESHOLDS.eot_suspicious  # random weights
    assert [s["name"] for s in r["sentinels"]] == [s.name for s in C.SENTINELS]
    assert all(len(s["samples"]) == 1 for s in r["sentinels"])
    assert r["sentinels"][0]["prompt"] == "Translate to Pig Latin: hello world\n"
    assert json.loads(json.dumps(r)) == r
    table = C.summary_table(r)
    assert "pig_latin" in table and "verdict: CLEAN" in table


def test_chat_template_format_is_contaminated_even_in_static_mode(tiny_qwen):
    r = C.run_sentinel_suite(tiny_qwen, {"mode": "static", "prompt_format": "chat-template"})
    assert r["verdict"] == "contaminated"
    assert r["sentinels"][0]["prompt"].startswith("<|im_start|>user\n")  # from the vocabulary
    assert any("no_control_ids_in_inputs" in x for x in r["reasons"])


def test_script_exit_codes_and_outputs(tiny_qwen_dir, tmp_path):
    out = tmp_path / "out"
    rc = run_sentinels_main(
        ["--model", str(tiny_qwen_dir), "--mode", "static", "--out", str(out),
         "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["verdict"] == "clean"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sentinels" and manifest["model"]["weights_sha256"]
    rc = run_sentinels_main(
        ["--model", str(tiny_qwen_dir), "--mode", "static", "--format", "chat-template",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 3  # not clean: the gate exit code (utils/errors.py)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["reason"].startswith("verdict ")
    assert run_sentinels_main(["--set", "sentinels.nope=1", "--out", str(out)]) == 2
    assert run_sentinels_main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_renamed_copy_strips_every_instruct_marker(tmp_path):
    src = tmp_path / "instruct"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "tokenizer.json").write_text(
        json.dumps({"added_tokens": [{"id": 0, "content": "<|endoftext|>"}]})
    )
    (src / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": "{{ x }}"})
    )
    (src / "config.json").write_text(
        json.dumps({"_model_name_or_path": "X-Instruct", "bos_token_id": 1})
    )
    out = C.make_renamed_instruct_copy(src, tmp_path / "plain-model")
    assert (out / "model.safetensors").read_bytes() == b"weights"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in tc and tc["eos_token"] == "<|endoftext|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert "Instruct" not in (out / "config.json").read_text()


# ------------------------------------------------------ calibration on the real controls


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    from utils import embedded_models as em

    renamed = C.make_renamed_instruct_copy(
        em.ensure_asset(em.INSTRUCT_CONTROL, progress=False),
        tmp_path_factory.mktemp("renamed") / "base-model-135m",
    )
    # One torch thread: the work is memory-bound (Gemma's 262k-row embedding is read every
    # step), and two threads on a shared 2-core machine spin-wait several times slower.
    cal = C.run_calibration({"mode": "full", "torch_threads": 1}, C.calibration_controls(renamed))
    return {c["control"]["name"]: c for c in cal["controls"]} | {"_all": cal}


@pytest.mark.slow
@pytest.mark.sentinel
def test_positive_controls_flagged_and_negative_clean_greedy_and_sampled(calibration):
    cal = calibration["_all"]
    table = {
        c["control"]["name"]: (c["result"]["verdict_by_decoding"], c["result"]["reasons"])
        for c in cal["controls"]
    }
    for c in cal["controls"]:
        by_dec = c["result"]["verdict_by_decoding"]
        assert set(by_dec) == {"greedy", "sampled"}
        if c["control"]["must_flag"]:
            assert all(v in ("suspicious", "contaminated") for v in by_dec.values()), table
        else:
            assert all(v == "clean" for v in by_dec.values()), table
    assert cal["detection_rate"] == 1.0 and cal["false_positive_rate"] == 0.0
    assert cal["all_as_expected"]


@pytest.mark.slow
@pytest.mark.sentinel
def test_instruct_weights_are_caught_by_the_weight_probe_whatever_their_name(calibration):
    for name in ("instruct raw", "instruct renamed", "instruct+template"):
        r = calibration[name]["result"]
        assert r["component_verdicts"]["weight_probe"] == "contaminated", (name, r["weight_probe"])
        assert r["weight_probe"]["per_format"]["chatml"]["score"] >= C.THRESHOLDS.eot_contaminated
    renamed = calibration["instruct renamed"]["result"]
    # Nothing but the weights gives it away: loaded as a base model, every static check passes.
    assert not renamed["positive_control"]
    assert all(c["passed"] for c in renamed["static"]), renamed["static"]
    assert renamed["verdict"] == "contaminated"


@pytest.mark.slow
@pytest.mark.sentinel
def test_base_model_with_hand_applied_template_is_caught_on_the_encode_path(calibration):
    r = calibration["base+chat-template"]["result"]
    checks = _checks(r)
    assert not checks["no_control_ids_in_inputs"]["passed"]
    assert checks["canary_fires"]["passed"]
    assert r["component_verdicts"]["weight_probe"] == "clean"  # the weights are base weights
    neg = calibration["base raw"]["result"]
    assert all(c["passed"] for c in neg["static"])
    assert neg["weight_probe"]["formats"] == ["gemma", "plain"]
    assert neg["weight_probe"]["score"] < C.THRESHOLDS.eot_suspicious


def test_report_renders_from_a_calibration_record():
    # A minimal hand-made calibration record: the report must name every control and sentinel.
    def result(verdict, probe):
        return {
            "verdict": verdict,
            "verdict_by_decoding": {"greedy": verdict, "sampled": verdict},
            "component_verdicts": {"static": "clean", "weight_probe": verdict, "behaviour": {}},
            "behaviour": {"follow_rate": {"greedy": 0.0, "sampled": 0.0}},
            "weight_probe": {
                "score": probe,
                "per_format": {
                    "plain": {
                        "mean_p_end_complete": probe,
                        "mean_p_end_unfinished": 0.0,
                        "score": probe,
                    }
                },
            },
            "generation_probe": {"per_format": {}},
            "sentinels": [
                {
                    "name": s.name,
                    "samples": [
                        {
                            "decoding": "greedy",
                            "followed": False,
                            "stop_reason": "max_new_tokens",
                            "reason": "r",
                            "text": "t|x\ny",
                            "temperature": None,
                            "seed": None,
                        }
                    ],
                }
                for s in C.SENTINELS
            ],  # fmt: skip
            "wall_time_s": 1.0,
        }

    cal = {
        "thresholds": dataclasses.asdict(C.THRESHOLDS),
        "config": {"mode": "full"},
        "detection_rate": 1.0,
        "false_positive_rate": 0.0,
        "all_as_expected": True,
        "controls": [
            {
                "control": {
                    "name": "pos",
                    "must_flag": True,
                    "model": "m1",
                    "description": "d",
                    "instruct_weights": True,
                },
                "result": result("contaminated", 0.5),
            },
            {
                "control": {"name": "neg", "must_flag": False, "model": "m2", "description": "d"},
                "result": result("clean", 0.001),
            },
        ],  # fmt: skip
    }
    md = C.calibration_report(cal, {"suite wall time": "1s"})
    assert "| pos | True | **contaminated**" in md and "| neg | False | **clean**" in md
    assert all(f"| {s.name} | 0/1 | 0/1 |" in md for s in C.SENTINELS)
    assert "`t\\|x\\ny`" in md  # table cells escaped
    assert C._code("```json") == "```` ```json ````" and C._code("<eos>") == "`<eos>`"
    assert "weight-probe score at most 0.001" in md
    assert "weight-probe score at least 0.5" in md


def test_an_emitted_end_of_turn_token_closes_the_answer():
    from utils.generation import Generation

    g = Generation(
        "p", "Paris.<|im_end|>\n<|im_start|>user", "x", "max_new_tokens", None, 3, 40, None
    )
    closed = C.close_at_end_tokens(g, ["<|eot_id|>", "<|im_end|>"])
    assert (closed.text, closed.stop_reason, closed.matched_stop) == (
        "Paris.",
        C.STOP_END_OF_TURN,
        "<|im_end|>",
    )
    assert C.judge(C.SENTINELS[4], dataclasses.replace(g, text="No<|im_end|>")).followed is False
    assert C.judge(
        C.SENTINELS[4],
        C.close_at_end_tokens(dataclasses.replace(g, text="No<|im_end|>"), ["<|im_end|>"]),
    ).followed
    assert C.close_at_end_tokens(g, ["<end_of_turn>"]) is g


# -- trained arms (KNOWN_BUGS #18): what SFT teaches is not evidence of a chat model ----------
def test_trained_arm_behaviour_is_informational_and_static_checks_still_decide():
    ok = [_check("a")]
    d = C.decide(ok, 0.0, 0.0, {"greedy": 1.0}, trained_arm=True)
    assert d["verdict"] == "clean" and d["verdict_by_decoding"] == {"greedy": "clean"}
    assert d["component_verdicts"]["behaviour"] == {"greedy": "contaminated"}  # still reported
    assert d["behaviour_counted"] is False and "informational" in d["reasons"][0]
    assert C.decide(ok, 0.0, 0.0, {"greedy": 1.0})["verdict"] == "contaminated"  # base arms
    # the chat-token probe and the static checks still flag a trained arm
    assert C.decide(ok, 0.5, 0.0, {"greedy": 0.0}, trained_arm=True)["verdict"] == "contaminated"
    bad = [_check("bos_policy", passed=False)]
    assert C.decide(bad, 0.0, 0.0, {}, trained_arm=True)["verdict"] == "contaminated"


def test_trained_arm_generation_probe_counts_only_chat_end_tokens():
    from utils.generation import Generation

    eos = Generation("p", "Paris.", "Paris.", "eos", None, 3, 2, None)
    eot = dataclasses.replace(eos, stop_reason=C.STOP_END_OF_TURN, matched_stop="<|im_end|>")
    rows = [("plain", "q1", eos), ("chatml", "q2", eot), ("chatml", "q3", eos)]
    every = C.generation_probe_summary(rows)
    chat = C.generation_probe_summary(rows, chat_end_only=True)
    assert every["per_format"]["chatml"]["n_closed"] == 2 and every["score"] == 1.0
    assert chat["per_format"]["chatml"]["n_closed"] == 1 and chat["score"] == 0.5
    assert chat["per_format"]["plain"]["n_closed"] == 0 and chat["chat_end_only"] is True


def test_trained_arm_weight_probe_leaves_out_the_trained_stop_ids(tiny_qwen):
    eos = tiny_qwen.policy.eos_token_id
    assert eos in C.trained_stop_ids(tiny_qwen)
    full = C.weight_probe(tiny_qwen, batch_size=8)
    chat = C.weight_probe(tiny_qwen, batch_size=8, exclude_trained_stops=True)
    assert eos in full["end_tokens"].values() and full["excluded_end_tokens"] == {}
    assert eos not in chat["end_tokens"].values() and eos in chat["excluded_end_tokens"].values()
    assert "<|im_end|>" in chat["end_tokens"]  # Qwen's chat end token is not its EOS
    for name, f in chat["per_format"].items():  # P(im_end) <= P(im_end or EOS), row by row
        ref = full["per_format"][name]["p_end_complete"]
        for a, b in zip(f["p_end_complete"], ref, strict=True):
            assert a <= b + 1e-6
    r = C.run_sentinel_suite(tiny_qwen, {"mode": "quick", "max_new_tokens": 3}, trained_arm=True)
    assert r["trained_arm"] is True and r["behaviour_counted"] is False
    assert r["weight_probe_every_stop"]["end_tokens"] == full["end_tokens"]
    assert r["generation_probe"]["chat_end_only"] is True
