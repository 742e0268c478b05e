"""Mean next-token NLL over a text: gemmakit vs llama.cpp (llama-cpp-python) on the same GGUF and token ids.

    python benchmarks/parity_llamacpp.py [--model PATH.gguf] [--tokens 1024] [--threads 2]

Prints both means, their relative difference (target: within 0.5%), the largest per-position logit
difference and how often the two argmaxes agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import gemmakit  # noqa: E402

TEXT = """\
The Industrial Revolution, which took place from the 18th to 19th centuries, was a period during which
predominantly agrarian, rural societies in Europe and America became industrial and urban. Prior to the
Industrial Revolution, which began in Britain in the late 1700s, manufacturing was often done in people's
homes, using hand tools or basic machines. Industrialization marked a shift to powered, special-purpose
machinery, factories and mass production. The iron and textile industries, along with the development of the
steam engine, played central roles in the Industrial Revolution, which also saw improved systems of
transportation, communication and banking. While industrialization brought about an increased volume and
variety of manufactured goods and an improved standard of living for some, it also resulted in often grim
employment and living conditions for the poor and working classes.

Britain had great deposits of coal and iron ore, which proved essential for industrialization. Also, Britain
was a politically stable society, as well as the world's leading colonial power, which meant its colonies
could serve as a source for raw materials, as well as a marketplace for manufactured goods. As demand for
British goods increased, merchants needed more cost-effective methods of production, which led to the rise of
mechanization and the factory system.

def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    result = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        result.append(total / window)
    return result

The printing press, developed in the fifteenth century, changed how knowledge moved through society. Before
it, books were copied by hand, which made them rare and expensive; a single volume could take months to
produce. Movable type allowed a workshop to print hundreds of identical copies in the time a scribe needed for
one. Prices fell, literacy spread beyond the clergy and the nobility, and ideas that once circulated among a
few scholars reached merchants, artisans and students across the continent. Scientists could compare
observations printed in the same tables, and errors could be corrected in later editions rather than copied
forever.

Photosynthesis is the process by which green plants, algae and some bacteria convert light energy into
chemical energy. In the chloroplasts of plant cells, chlorophyll absorbs mostly red and blue light and uses
that energy to split water molecules, releasing oxygen as a by-product. The energy captured in this way is
stored in two carrier molecules, which then power a cycle of reactions that fix carbon dioxide from the air
into sugars. Those sugars feed the plant and, directly or indirectly, nearly every other living thing on Earth.

A good recipe for bread needs only four ingredients: flour, water, salt and yeast. Mix five hundred grams of
flour with three hundred and fifty grams of warm water, add ten grams of salt and a teaspoon of dried yeast,
and knead the dough for about ten minutes until it is smooth and elastic. Let it rise in a covered bowl until
it has doubled in size, shape it into a loaf, let it rise again, and bake it in a hot oven for around forty
minutes, until the crust is deep brown and the loaf sounds hollow when tapped underneath.

SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue
FROM orders
WHERE created_at >= '2024-01-01'
GROUP BY customer_id
HAVING COUNT(*) > 3
ORDER BY revenue DESC
LIMIT 10;

La révolution industrielle est un processus historique du XIXe siècle qui fait basculer une société à
dominante agraire et artisanale vers une société commerciale et industrielle. Cette transformation touche
profondément l'agriculture, l'économie, la politique, la société et l'environnement.
"""


def nll_from_logits(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Per-position NLL of the next token: logits (T, V) -> (T-1,)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def llamacpp_logits(path: str, ids: list[int], threads: int, kv_f32: bool) -> torch.Tensor:
    from llama_cpp import Llama

    kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}  # 0 = GGML_TYPE_F32
    llm = Llama(model_path=path, n_ctx=len(ids) + 8, n_batch=512, logits_all=True, n_threads=threads,
                verbose=False, **kv)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--kv-f32", action="store_true", help="llama.cpp keeps its KV cache in f32 (default f16)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or str(gemmakit.default_model_path())

    llm = gemmakit.load(path, threads=args.threads)
    ids = llm.tokenizer.encode(TEXT, add_bos=True)[: args.tokens]
    t0 = time.perf_counter()
    ours = llm.logits(ids)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = llamacpp_logits(path, ids, args.threads, args.kv_f32)
    t_ref = time.perf_counter() - t0

    nll_ours, nll_ref = nll_from_logits(ours, ids), nll_from_logits(ref, ids)
    mean_ours, mean_ref = float(nll_ours.mean()), float(nll_ref.mean())
    agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"model            {Path(path).name}")
    print(f"tokens           {len(ids)}   llama.cpp KV cache {'f32' if args.kv_f32 else 'f16 (default)'}")
    print(f"mean NLL         gemmakit {mean_ours:.5f}   llama.cpp {mean_ref:.5f}")
    print(f"relative diff    {100 * (mean_ours - mean_ref) / mean_ref:+.3f}%   (target: within 0.5%)")
    print(f"perplexity       gemmakit {np.exp(mean_ours):.3f}   llama.cpp {np.exp(mean_ref):.3f}")
    diff = (ours - ref).abs().amax(-1)
    print(f"max |logit diff| {float(diff.max()):.4f} (at position {int(diff.argmax())}), median {float(diff.median()):.4f}")
    print(f"argmax agreement {100 * agree:.2f}%")
    print(f"forward time     gemmakit {t_ours:.2f}s   llama.cpp {t_ref:.2f}s (full-vocab logits at every position)")


if __name__ == "__main__":
    main()
