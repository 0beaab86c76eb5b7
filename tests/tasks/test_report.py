import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from tasks import report
from tasks.pipeline import artifacts
from tasks.evaluate import metrics
from tasks.pipeline.config import load_config
from tasks.evaluate.evaluation import evaluate
from tasks.pipeline.prompt_suite import load_suite

pytestmark = pytest.mark.model

HOSTILE = [
    "<script>alert('x')</script>",
    "</textarea><img src=x onerror=alert(1)>",
    "\" onmouseover=\"alert(1)",
    "{{ config.__class__ }} {% raw %}",
    "line\nbreaks\tand\u202eRTL\u200bzero-width",
    "x" * 20000,
]


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text, self.ids, self.hrefs = [], [], [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]
        d = dict(attrs)
        if "id" in d:
            self.ids.add(d["id"])
        if tag == "a" and "href" in d:
            self.hrefs.append(d["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_shows_every_prompt_side_by_side(tiny_run):
    html = artifacts.report_path(tiny_run).read_text()
    answers = artifacts.read_answers(tiny_run)
    for p in load_suite("v1")["prompts"]:
        assert f'id="prompt-{p["id"]}"' in html
    assert html.count('class="answer base"') == html.count('class="answer tuned"') == len(answers["models"]["base"])
    assert "<polyline" in html and "Training loss per step" in html
    assert answers["suite"]["sha256"] in html
    assert "http://" not in html.replace("http://www.w3", "") and "<link" not in html and "<script src" not in html


def test_every_in_page_link_resolves(tiny_run):
    parsed = Collector()
    parsed.feed(artifacts.report_path(tiny_run).read_text())
    assert parsed.hrefs, "the report has a table of contents"
    for href in parsed.hrefs:
        assert href.startswith("#") and href[1:] in parsed.ids, href


def test_verdict_comes_first_and_metrics_are_stored(tiny_run):
    html = artifacts.report_path(tiny_run).read_text()
    m = artifacts.read_metrics(tiny_run)
    assert html.index('id="verdict"') < html.index('id="metrics"') < html.index('id="prompts"')
    assert ("PASSED" if m["gate"]["passed"] else "FAILED") in html[html.index('id="verdict"'):html.index('id="metrics"')]
    assert m["heldout"]["n"] == 8 and len(m["per_prompt"]) == len(load_suite("v1")["prompts"])
    # The verdict gives each test's power: the smallest change it would detect, significant or not.
    verdict = html[html.index('id="verdict"'):html.index('id="use"')]
    assert "detectable change (80% power)" in verdict
    assert f'<td class="num mde">{m["heldout"]["rouge_l_delta_ci"]["mde_80"]:.4f}</td>' in verdict
    assert f'<td class="num mde">{m["perplexity"]["delta_ci"]["mde_80"]:.3f}</td>' in verdict


def test_untrusted_text_is_escaped(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    answers_path = run_dir / "generate" / artifacts.ANSWERS
    answers = json.loads(answers_path.read_text())
    for group in ("models", "heldout"):
        for model in ("base", "tuned"):
            for i, a in enumerate(answers[group][model][: len(HOSTILE)]):
                a["text"] = HOSTILE[i]
                a["prompt"] = HOSTILE[-1 - i]
                if group == "heldout":
                    a["reference"] = HOSTILE[i - 1]
                    # Multi-turn: the turns so far, and a category, come from the data too.
                    a["earlier_turns"] = [{"role": "user", "content": HOSTILE[i - 2]}, {"role": "assistant", "content": HOSTILE[i - 3]}]
                    a["category"] = HOSTILE[i - 4]
    answers_path.write_text(json.dumps(answers))
    manifest_path = run_dir / "snapshot" / artifacts.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["source"] = HOSTILE[0]
    manifest["dataset"] = HOSTILE[2]
    manifest["dataset_format"] = HOSTILE[3]
    manifest["chat_styles"] = {HOSTILE[1]: 1}
    manifest["category_counts"][HOSTILE[1]] = 1
    manifest_path.write_text(json.dumps(manifest))
    prep_path = run_dir / "preprocess" / artifacts.MANIFEST
    prep = json.loads(prep_path.read_text())
    prep["example"], prep["template"] = HOSTILE[0] + HOSTILE[1], HOSTILE[2]
    prep_path.write_text(json.dumps(prep))

    cfg = load_config("tiny_test")
    html = report.render(report.gather(cfg, run_dir, evaluate(cfg, run_dir)))
    parsed = Collector()
    parsed.feed(html)
    assert parsed.tags.count("script") == 1  # the report's own filter script, nothing injected
    assert "img" not in parsed.tags
    assert "onerror" not in parsed.attrs and "onmouseover" not in parsed.attrs
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    text = "".join(parsed.text)
    for h in HOSTILE:  # the reader sees the text as it was, literally
        assert h in text
    assert "{{ config" in text  # not evaluated as a template
    assert 'id="rendered-example"' in html and html.count('<ol class="earlier-turns">') >= len(HOSTILE)


def test_line_chart_handles_empty_and_flat_series():
    assert report.line_chart({"x": []})["empty"]
    flat = report.line_chart({"x": [1.0, 1.0, 1.0]})
    assert not flat["empty"] and len(flat["lines"][0]["points"].split()) == 3
    pts = report.line_chart({"x": [3.0, 2.0, 1.0]}, width=100, height=100, pad=10)["lines"][0]["points"]
    ys = [float(p.split(",")[1]) for p in pts.split()]
    assert ys == sorted(ys)  # falling loss draws downwards (SVG y grows downwards)
    assert all(re.fullmatch(r"[\d.]+,[\d.]+", p) for p in pts.split())


def test_report_needs_every_stage(tmp_path):
    from tasks.pipeline.storage import StageInputError

    with pytest.raises(StageInputError):
        report.run(load_config("tiny_test"), tmp_path)


def test_verdict_box_gives_both_intervals_and_says_what_they_mean(tiny_run):
    html = artifacts.report_path(tiny_run).read_text()
    m = artifacts.read_metrics(tiny_run)
    box = html[html.index('id="verdict"'):html.index('id="use"')]
    rci, pci = m["heldout"]["rouge_l_delta_ci"], m["perplexity"]["delta_ci"]
    # The perplexity interval resamples the same examples finetune scored.
    assert pci["n"] == m["perplexity"]["examples"] == 8 and pci["low"] <= pci["mean"] <= pci["high"]
    assert f"[{rci['low']:+.4f}, {rci['high']:+.4f}]" in box and f"[{pci['low']:+.3f}, {pci['high']:+.3f}]" in box
    words = re.findall(r'<strong class="verdict-words">([^<]*)</strong>', box)
    assert words == [m["significance"]["rouge_l"], m["significance"]["perplexity"]]
    allowed = re.compile(r"(better|worse), significant at 95%|no significant change; this test could only detect "
                         r"changes above [0-9.e+-]+ \(80% power, n = \d+\)")
    assert all(allowed.fullmatch(w) for w in words), words
    assert m["significance"]["perplexity"] == metrics.significance(pci, higher_is_better=False)


def test_formats_not_yet_loaded_elsewhere_read_as_written_not_as_failed(tiny_run):
    """A first `make demo` has no parity runtimes: the report says the formats were written but not
    yet loaded elsewhere, and how to check them, with no failure-coloured badge; a checked format
    that differs is still a warning."""
    cfg = load_config("tiny_test")
    context = report.gather(cfg, tiny_run, artifacts.read_metrics(tiny_run))
    missing = {"checked": False, "reason": "llama-cpp-python not installed (llama_cpp)"}
    context.update(export={"variant": None, "base_preset": "tiny:gemma3", "merged_layers": 4, "merge_dtype": "float32",
                           "formats": ["keras", "hf", "gguf"],
                           "parity": {"keras": {"checked": True, "runtime": "keras-hub", "passed": True, "max_abs_logit_diff": 0.0},
                                      "hf": {"checked": False, "reason": "transformers/torch not installed (torch)"},
                                      "gguf-f16": missing, "gguf-q8_0": missing}},
                   export_files=[], export_error=None)
    use = report.render(context)
    use = use[use.index('id="use"'):use.index('id="metrics"')]
    assert "3 of 4 formats were written but not yet loaded elsewhere" in use and "<code>make parity</code>" in use
    assert use.count('<span class="tag">not yet checked</span>') == 3 and 'class="tag warn"' not in use
    assert '<span class="tag ok">same</span>' in use

    context["export"]["parity"] = {"keras": {"checked": True, "runtime": "keras-hub", "passed": False, "max_abs_logit_diff": 0.5}}
    use = report.render(context)
    use = use[use.index('id="use"'):use.index('id="metrics"')]
    assert "not yet loaded" not in use and '<span class="tag warn">differs</span>' in use
