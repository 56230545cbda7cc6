"""Exam runner: GAOKAO-Bench extraction/scoring (exact re-scoring), items loader, a real OpenAI-compatible HTTP
server on 127.0.0.1 and a real tiny HF model, matrix building."""

from __future__ import annotations

import http.server
import json
import threading
import time

import numpy as np
import pytest

from lmlab.config import ConfigError
from lmlab.errors import LmlabError
from lmlab.evaluate import exam

# --------------------------------------------------------------------------------------------------------------
# extraction and scoring


def test_extractors_follow_gaokao_bench():
    assert exam.extract_single("【解析】 A 不对，B 也不对 ... 【答案】 C <eoa>", 1) == ["C"]
    assert exam.extract_single("no letters here", 1) == []
    out = "(1)【答案】: B <eoa> (2)【答案】：D <eoa>"
    assert exam.extract_multi_question(out, 2) == ["B", "D"]
    assert exam.extract_multi_question("I think A then C and E", 2) == ["I", "A"]  # first n capitals, as upstream
    assert exam.extract_multi_choice("【解析】 ... 【答案】 A C <eoa>", 1) == ["AC"]
    assert exam.extract_multi_choice("long reasoning without the tag ... final: BD", 1) == ["BD"]
    assert exam.extract_five_of_seven("A G C B E F D", 5) == ["A", "G", "C", "B", "E"]


def test_score_rules_and_length_mismatch():
    item = {"type": "multi_choice", "answer": ["ACD"], "points": 6.0}
    assert exam.score_output(item, "【答案】ACD")["score"] == 6.0
    assert exam.score_output(item, "【答案】AC")["score"] == 3.0  # physics 6/3/0
    assert exam.score_output(item, "【答案】AB")["score"] == 0.0
    assert exam.score_output(item, "【答案】AC", multi_rule="proportional")["score"] == pytest.approx(4.0)
    mq = {"type": "multi_question_choice", "answer": ["A", "B", "C"], "points": 2.0}
    r = exam.score_output(mq, "【答案】A 【答案】B")  # 2 tags for 3 questions -> first 3 capitals
    assert r["extracted"] == ["A", "B"] and r["sub_scores"] == [0.0, 0.0, 0.0]  # length mismatch -> all wrong
    r = exam.score_output(mq, "【答案】A 【答案】B 【答案】D")
    assert r["sub_scores"] == [2.0, 2.0, 0.0] and r["score"] == 4.0 and r["max_score"] == 6.0
    assert not r["full_credit"]


def test_strip_thinking_before_extraction():
    item = {"type": "single_choice", "answer": ["B"], "points": 5.0}
    out = "<think>maybe A? or D... let me check C</think>【答案】B <eoa>"
    assert exam.score_output(item, out)["score"] == 5.0  # last [A-D] is B either way
    out2 = "【答案】B <eoa><think>on reflection D</think>"
    assert exam.score_output(item, out2)["score"] == 0.0
    assert exam.score_output(item, out2, strip_think=True)["score"] == 5.0
    assert exam.strip_thinking("<think>unterminated A B C") == ""
    assert exam.strip_thinking("reasoning A</think> final B") == " final B"


def test_fill_blank_normalized_match():
    assert exam.fill_match("The answer is 42.", "42")
    assert exam.fill_match(" 3/4 ", "0.75")
    assert exam.fill_match("Paris.", "paris")
    assert not exam.fill_match("41", "42")
    item = {"type": "fill_blank", "answer": ["82"], "points": 1.0}
    assert exam.score_output(item, " 82\nQ: next question")["full_credit"]
    assert exam.score_output(item, " 3 * 4 = 12. 12 + 70 = 82. The answer is 82.")["full_credit"]
    assert not exam.score_output(item, " 81")["full_credit"]


def test_rescore_gaokao_bench_gpt4_exact(shared_data):
    res = exam.rescore_gaokao_results(shared_data / "gaokao-bench" / "Results" / "gpt_4_0314_obj")
    assert res["total_score"] == 9702.0
    assert res["correct_score"] == 7000.0
    assert res["question_num"] == 2944.0
    assert res["scoring_rate"] == 0.722
    assert res["mismatches"] == []
    assert res["items"] == 1781
    stored = json.loads((shared_data / "gaokao-bench" / "Results" / "gpt_4_0314_obj" / "result" /
                         "correction_score.json").read_text())
    for subj, v in res["subject"].items():
        assert v["correct"] == stored["subject"][subj]["correct_score"], subj


def test_load_gaokao_bench_natively(shared_data):
    items = exam.load_items(str(shared_data / "gaokao-bench"))
    assert len(items) == 1781 and sum(len(i["answer"]) for i in items) == 2944
    types = {i["type"] for i in items}
    assert types == {"single_choice", "multi_choice", "multi_question_choice", "five_out_of_seven"}
    phys = [i for i in items if i["subject"] == "Physics"]
    assert phys and all(i["type"] == "multi_choice" and i["points"] == 6.0 for i in phys)
    assert exam.build_prompt(items[0]).startswith("请你做一道英语选择题")
    one = exam.load_items(str(shared_data / "gaokao-bench" / "Data" / "Objective_Questions" /
                              "2010-2022_Physics_MCQs.json"), limit=3)
    assert len(one) == 3 and one[0]["type"] == "multi_choice"


def test_items_file_errors(tmp_path):
    p = tmp_path / "items.jsonl"
    good = {"id": "q1", "type": "single_choice", "question": "1+1? A. 2 B. 3", "answer": ["A"], "points": 5}
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(LmlabError, match=r"items.jsonl:2: malformed JSON"):
        exam.load_items(str(p))
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "q2", "type": "essay"}) + "\n")
    with pytest.raises(LmlabError, match=r"items.jsonl:2: unknown question type 'essay'"):
        exam.load_items(str(p))
    p.write_text(json.dumps({**good, "answer": []}) + "\n")
    with pytest.raises(LmlabError, match="answer must be a non-empty list"):
        exam.load_items(str(p))
    with pytest.raises(LmlabError, match="not found"):
        exam.load_items(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="openai:BASE_URL#MODEL_NAME"):
        exam.ExamConfig(model=["openai:http://127.0.0.1:1/v1"])


# --------------------------------------------------------------------------------------------------------------
# a real OpenAI-compatible server


ANSWERS = {"q1": "<think>Let me think: A or B. I pick A.</think>【答案】B <eoa>",
           "q2": "【解析】 easy 【答案】 C <eoa> trailing",
           "q3": "The answer is 12."}


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        if self.path.startswith("/garbage"):
            payload = b"<html>oops</html>"
        else:
            qid = next((k for k in ANSWERS if f"[{k}]" in prompt), None)
            if qid == "q3" and self.path.startswith("/flaky"):
                self.server.hits = getattr(self.server, "hits", 0) + 1
                if self.server.hits == 1:  # first attempt fails, the retry succeeds
                    self.send_response(503)
                    self.end_headers()
                    return
            text = ANSWERS.get(qid, "no idea")
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text),
                                            "completion_tokens_details": {"reasoning_tokens": 7}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def items_file(tmp_path):
    rows = [{"id": "q1", "subject": "math", "type": "single_choice", "question": "[q1] pick", "answer": ["B"],
             "points": 5, "difficulty": -1.0},
            {"id": "q2", "subject": "math", "type": "single_choice", "question": "[q2] pick", "answer": ["A"],
             "points": 5, "difficulty": 0.0},
            {"id": "q3", "subject": "physics", "type": "fill_blank", "question": "[q3] 3*4?", "answer": ["12"],
             "points": 2, "difficulty": 1.0}]
    p = tmp_path / "items.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_openai_backend_end_to_end(server, items_file, tmp_path):
    cfg = exam.ExamConfig(items=str(items_file), model=[f"openai:{server}/flaky/v1#stub", f"openai:{server}/v1#s2"],
                          strip_thinking=True, backoff=0.01, concurrency=3, out=str(tmp_path / "run"))
    run = exam.main(cfg)
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    first = [r for r in rows if r["model"].endswith("#stub")]
    assert [r["item_id"] for r in first] == ["q1", "q2", "q3"]
    assert [r["score"] for r in first] == [5.0, 0.0, 2.0]  # q1 correct only after <think> stripping
    assert first[0]["stripped_output"] == "【答案】B "  # cut at the stop string <eoa>
    assert first[0]["tokens"]["reasoning"] == 7 and first[0]["tokens"]["prompt"] > 0
    assert not any(r["failed"] for r in rows)
    res = json.loads((run / "results.json").read_text())
    m = res["models"][f"openai:{server}/flaky/v1#stub"]
    assert m["score"] == 7.0 and m["max"] == 12.0 and m["subjects"]["math"]["rate"] == 0.5
    # matrix: binary at full credit, plus token means for the `tokens` difficulty source
    mat = exam.build_matrix(rows, "binary", item_meta={"q1": {"difficulty": -1.0}})
    assert mat.persons == [f"openai:{server}/flaky/v1#stub", f"openai:{server}/v1#s2"]
    np.testing.assert_array_equal(mat.values, [[1, 0, 1], [1, 0, 1]])
    assert mat.item_meta["q1"]["mean_reasoning_tokens"] == 7.0 and mat.item_meta["q1"]["difficulty"] == -1.0
    mrun = exam.matrix_main(exam.MatrixConfig(runs=[str(run)], out=str(tmp_path / "mat")))
    saved = json.loads((mrun / "matrix.json").read_text())
    assert saved["values"] == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    assert (mrun / "matrix.csv").read_text().splitlines()[0] == "model,q1,q2,q3"


def test_openai_timeouts_and_garbage_are_failed_samples(server, items_file, tmp_path):
    cfg = exam.ExamConfig(items=str(items_file), model=[f"openai:{server}/slow/v1#s", f"openai:{server}/garbage/v1#g",
                                                        "openai:http://127.0.0.1:9/v1#closed"],
                          timeout=0.2, retries=1, backoff=0.01, out=str(tmp_path / "run"))
    run = exam.main(cfg)
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["failed"] for r in rows)  # nothing lost: one row per model x item
    errs = {r["model"].split("#")[1]: r["error"] for r in rows}
    assert "bad response" in errs["g"]
    assert "timed out" in errs["s"].lower() or "timeout" in errs["s"].lower()
    res = json.loads((run / "results.json").read_text())
    assert res["failed"] == 9
    mat = exam.build_matrix(rows)
    assert np.isnan(mat.values).all()  # failed = missing, not wrong
    assert (exam.build_matrix(rows, include_failed=True).values == 0).all()


def test_binomial_and_partial_matrix():
    rows = []
    for k in range(4):
        for m, ok in (("a", [1, 1, 0]), ("b", [1, 0, 0])):
            for i, x in enumerate(ok):
                full = bool(x) if k < 3 else not x
                rows.append({"model": m, "item_id": f"i{i}", "sample": k, "score": 2.0 * full, "max_score": 2.0,
                             "full_credit": full, "failed": False, "tokens": {"completion": 10 * (i + 1)}})
    mb = exam.build_matrix(rows, "binomial")
    np.testing.assert_array_equal(mb.values, [[3, 3, 1], [3, 1, 1]])
    np.testing.assert_array_equal(mb.K, 4)
    mp = exam.build_matrix(rows, "partial")
    np.testing.assert_allclose(mp.values, [[0.75, 0.75, 0.25], [0.75, 0.25, 0.25]])


# --------------------------------------------------------------------------------------------------------------
# a real tiny HF model


def test_hf_backend_tiny_model(tiny_llama, tmp_path):
    """Batched greedy generation with left padding equals unbatched; chat template is applied; stop strings cut."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 :?\nQA.")
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>"] + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    cfg = exam.ExamConfig(model=["tiny"], max_new_tokens=6, stop=["zz"], batch_size=3)
    be = exam.HFBackend("tiny", "cpu", None, cfg.max_new_tokens, cfg.stop, cfg.batch_size, model=tiny_llama,
                        tokenizer=tok)
    assert not be.use_chat
    prompts = ["Q: 1+1?\nA:", "Q: what is the longest prompt here?\nA:", "hi"]
    batched = be.generate(prompts)
    single = [be.generate([p])[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.completion_tokens <= 6 and g.prompt_tokens > 0 for g in batched)
    tok.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}"
    be2 = exam.HFBackend("tiny", "cpu", None, 6, [], 3, chat_template="auto", model=tiny_llama, tokenizer=tok)
    assert be2.use_chat and be2.format("x") == "Q: x\nA:"
    out = be2.generate(["x"])[0]
    assert out.finish_reason in ("length", "stop") and isinstance(out.text, str)


def test_exam_main_on_reference_model(ref_zoo, tmp_path):
    run = exam.main(exam.ExamConfig(items="builtin:math:6", model=["ref:dense"], max_new_tokens=6, stop=["\n"],
                                    out=str(tmp_path / "run")))
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["item_id"] for r in rows} == {f"math/{k}" for k in range(6)}
    assert all(r["score"] in (0.0, 1.0) and "\n" not in r["raw_output"] for r in rows)
    res = json.loads((run / "results.json").read_text())
    assert res["models"]["ref:dense"]["n"] == 6 and res["items_per_s"] > 0
    items = json.loads((run / "items.json").read_text())
    assert all("difficulty" in it for it in items)


@pytest.mark.slow
def test_tour_section_quick(ref_zoo, tmp_path):
    from lmlab.tour import TourConfig

    path, summary = exam.tour_exam(TourConfig(threads=1), tmp_path / "exam_irt", taker_sizes=(32,),
                                   taker_steps=(3, 6), taker_schedule=6)
    res = json.loads((path / "results.json").read_text())
    assert set(res["models"]) == {"ref:dense", "ref:mamba", "tiny-h32@3", "tiny-h32@6"}
    d1 = res["d1_human"]
    assert len(d1) == 10 and d1["sim:rasch(θ=+0.5)"]["label"] in ("rasch_consistent", "steeper")
    assert "2 trained takers" in summary
    assert d1["sim:invariant(p=.6)"]["label"] in ("difficulty_invariant", "inverted")
    for plot in ("wright_map.png", "model_curves_human.png"):
        assert (path / "plots" / plot).is_file()
    assert "D1" in summary and (path / "report.md").is_file()


def test_open_items_take_imported_scores(server, tmp_path):
    items = tmp_path / "open.jsonl"
    items.write_text(json.dumps({"id": "o1", "subject": "math", "type": "open", "question": "[q3] prove it",
                                 "answer": ["proof"], "points": 12}) + "\n" +
                     json.dumps({"id": "o2", "subject": "math", "type": "open", "question": "[q3] and this",
                                 "answer": ["proof"], "points": 12}) + "\n")
    model = f"openai:{server}/v1#judge-me"
    scores = tmp_path / "scores.csv"
    scores.write_text(f"item_id,model,rater,score\no1,{model},t1,12\no1,{model},t2,9\no1,{model},t3,12\n")
    run = exam.main(exam.ExamConfig(items=str(items), model=[model], open_scores=str(scores), backoff=0.01,
                                    out=str(tmp_path / "run")))
    rows = {r["item_id"]: r for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())}
    assert rows["o1"]["score"] == pytest.approx(11.0) and rows["o1"]["rater_scores"] == [12.0, 9.0, 12.0]
    assert rows["o2"]["score"] is None and rows["o2"]["graded"] is False  # no scores imported: ungraded
    res = json.loads((run / "results.json").read_text())["models"][model]
    assert res["ungraded"] == 1 and res["score"] == 11.0 and res["max"] == 12.0
    m = exam.build_matrix(list(rows.values()), "partial")
    assert m.values[0, 0] == pytest.approx(11 / 12) and np.isnan(m.values[0, 1])


def test_checkpoint_takers_are_cached_real_models(ref_zoo, tmp_path):
    import torch

    from lmlab.core.models import load_model

    out = exam.checkpoint_takers((32,), (2, 5), schedule=5, cache=tmp_path / "takers", max_bytes=20_000)
    assert list(out) == ["tiny-h32@2", "tiny-h32@5"]
    a, b = (load_model(str(p), "cpu", torch.float32) for p in out.values())
    wa = dict(a.named_parameters())
    assert any(not torch.equal(wa[n], p) for n, p in b.named_parameters())  # the checkpoints differ
    assert json.loads((out["tiny-h32@5"] / "taker.json").read_text())["step"] == 5
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "takers").rglob("*.safetensors")}
    again = exam.checkpoint_takers((32,), (2, 5), schedule=5, cache=tmp_path / "takers", max_bytes=20_000)
    assert again == out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "takers").rglob("*.safetensors")} == stamps  # no retrain
    cfg = exam.ExamConfig(items="builtin:math", model=[str(out["tiny-h32@2"])], max_new_tokens=4, batch_size=4)
    rows = exam.run_exam(exam.builtin_math(4), [exam.make_backend(str(out["tiny-h32@2"]), cfg)], cfg)
    assert len(rows) == 4 and all(r["score"] in (0.0, 1.0) for r in rows)
    with pytest.raises(LmlabError, match="schedule"):
        exam.checkpoint_takers((32,), (2, 9), schedule=5, cache=tmp_path / "takers")
