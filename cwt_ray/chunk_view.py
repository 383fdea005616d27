"""What the chunk stage shows people: summary.json (counts, lengths) and view.html (chunks by eye)."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import ChunkConfig

# Colour-blind-safe pastel backgrounds, cycled per chunk.
_COLOURS = ["#cfe2f3", "#fce5cd", "#d9ead3", "#ead1dc", "#fff2cc", "#d0e0e3", "#f4cccc", "#d9d2e9"]


def _dist(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values, dtype=float)
    return {"min": float(a.min()), "p25": float(np.percentile(a, 25)), "median": float(np.median(a)),
            "p75": float(np.percentile(a, 75)), "max": float(a.max()), "mean": float(a.mean())}


def summarise(table: pa.Table, rows_in: int, rejected: int, cfg: ChunkConfig) -> dict:
    rows = table.to_pylist()
    per = [r["num_chunks"] for r in rows]
    summary = {
        "heuristic": cfg.heuristic, "params": cfg.model_dump(), "rows_in": rows_in, "chunked": len(rows),
        "rejected": rejected, "chunks": int(sum(per)),
        "chunks_per_rationale": {str(k): per.count(k) for k in sorted(set(per))},
        # Short rationales (fewer steps than K) and, with target_chunk_tokens or the semantic
        # threshold, short or uniform ones get fewer than K chunks: how many did is worth seeing.
        "fewer_chunks_than_k": sum(k < cfg.num_chunks for k in per),
        "chunk_tokens": _dist([t for r in rows for t in r["chunk_tokens"]]),
        "score": _dist([r["score"] for r in rows if r["score"] is not None]),
    }
    assert rows_in == len(rows) + rejected, (rows_in, len(rows), rejected)
    if cfg.heuristic == "sbc":
        searched = [r for r in rows if r["loss_before"] is not None]
        summary["sbc"] = {
            "searched": len(searched), "skipped": len(rows) - len(searched),
            # A greedy search only accepts improvements, so 'after' <= 'before' by construction:
            # a diagnostic of the search, not evidence that the chunks are better for training.
            "mean_loss_before": float(np.mean([r["loss_before"] for r in searched])) if searched else None,
            "mean_loss_after": float(np.mean([r["loss_after"] for r in searched])) if searched else None,
            "moves": int(sum(r["moves"] for r in searched)),
            "candidates_scored": int(sum(r["candidates_scored"] for r in searched)),
        }
    return summary


def write_view(table: pa.Table, records: dict[str, dict], path: Path, samples: int) -> None:
    """A static page, no server and no external assets: each chunk in its own colour, its token
    count and the score of the boundary that ends it on hover and in a badge."""
    parts = []
    for r in table.slice(0, samples).to_pylist():
        rec = records.get(r["id"], {})
        spans = []
        for i, chunk in enumerate(r["chunks"]):
            score = r["boundary_scores"][i] if i < len(r["boundary_scores"]) else None
            badge = f"<sup class=b>|{score:.2f}</sup>" if score is not None else ""
            title = f"chunk {i + 1}: {r['chunk_tokens'][i]} tokens" + (f"; boundary score {score:.3f}" if score is not None else "")
            spans.append(f'<span class=c style="background:{_COLOURS[i % len(_COLOURS)]}" title="{html.escape(title)}">'
                         f"{html.escape(chunk)}</span>{badge}")
        extra = ""
        if r["loss_before"] is not None:
            extra = f" · loss {r['loss_before']:.3f} → {r['loss_after']:.3f}, {r['moves']} moves"
        score = f"{r['score']:.3f}" if r["score"] is not None else "–"
        parts.append(
            f"<section><h3>{html.escape(r['id'])}</h3><p class=q>{html.escape(str(rec.get('question', '')))}</p>"
            f"<pre>{''.join(spans)}</pre><p class=m>{r['num_chunks']} chunks · score {score}{extra}"
            f"{' · ' + html.escape(r['note']) if r['note'] else ''} · answer {html.escape(str(rec.get('answer', '')))}</p></section>")
    heuristic = table.column("heuristic")[0].as_py() if table.num_rows else "n/a"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>chunks: {html.escape(heuristic)}</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}}
pre{{white-space:pre-wrap;font:14px/1.6 ui-monospace,monospace;margin:.4em 0}}
.c{{border-radius:3px;padding:1px 0}} .b{{color:#888;font-size:11px}} .q{{color:#555}} .m{{color:#777;font-size:13px}}
section{{border-bottom:1px solid #eee;padding:.6em 0}}</style></head><body>
<h1>Chunked rationales ({html.escape(heuristic)})</h1>
<p>{min(samples, table.num_rows)} of {table.num_rows} rationales. Each chunk has its own colour; hover for its token
count. Badges give the score of the boundary that ends a chunk (cosine similarity of the steps on either side, where
embeddings were used: low means a clean topic change).</p>
{''.join(parts)}</body></html>"""
    path.write_text(page, encoding="utf-8")
