"""Training-free DP synthetic text: DP few-shot generation by noisy aggregation of in-context votes.

Method: Tang, Shin, Inan, Manoel, Mireshghallah, Lin, Gopi, Kulkarni, Sim, "Privacy-preserving in-context
learning with differentially private few-shot generation" (ICLR 2024); the rigorous form of SafeSynthDP's
"noise in generation" (arXiv 2412.20641). Mechanisms: Dwork & Roth 2014, "The Algorithmic Foundations of
Differential Privacy" (Laplace: Thm 3.6; Gaussian: Thm A.1 / App. A; post-processing: Prop 2.1).

How one synthetic example of label L is generated, token by token:

1. The train split's examples of label L are assigned to ``groups`` disjoint groups by a keyed hash of the
   record (never by position: inserting one record into a shuffled list would move every later record to
   another group). A group uses at most ``examples_per_group`` of its records (smallest hash first). The
   number of groups is fixed by the config, not by the data.
2. Each group prompts the public base model with its own examples (``prefix + text`` lines, the Prefix-LM
   prefix of Kurakin et al. 2023) followed by ``prefix + tokens so far``; all rows are scored in one batched
   step per token: one ``generate`` on vLLM (prefix caching) or one forward on transformers (KV cache).
   Both engines return the model's raw next-token logits, so the votes below do not depend on the engine.
3. Each group's vote is its next-token distribution at ``temperature`` restricted to the candidate set
   (the public model's top ``candidates`` tokens given only ``prefix + tokens so far``: no private data,
   Tang et al.'s "reduce vocabulary publicly"), optionally clipped to its top-k and renormalised, so every
   vote is a probability vector (L1 norm 1).
4. The votes are summed and Laplace (scale b) or Gaussian (std sigma) noise is added to every coordinate;
   the released token is the noisy argmax (post-processing of the noisy histogram).

Adjacency and sensitivity: add/remove one example. The record lands in exactly one group (its hash), and
can change only that group's prompt (it may displace one member of that group), so exactly one vote
changes, from one probability vector to another: L1 change <= 2, L2 change <= sqrt(2). The events are
normalised to sensitivity 1 (dpsynth.privacy.events): Laplace(noise_multiplier = b / 2),
Gaussian(noise_multiplier = sigma / sqrt(2)). The Gaussian is isotropic, so the 1-d pair at shift
sqrt(2) is exact for any L2 shift. For Laplace the PLD accounting treats the vector mechanism through the
1-d Laplace pair at shift Delta_1 (as dp_accounting's LaplaceDpEvent does); the certificate also records
the unconditional pure-DP bound (basic composition of Delta_1 / b per token) next to it.

Public fallback (optional): the count of groups whose top token equals the public model's top token has
sensitivity 1; it is released with its own noise and compared with a threshold, and when it passes the
public token is emitted instead of the noisy argmax. Both mechanisms are charged at every step, so the
fallback improves utility but never saves budget (sparse-vector-style savings are not claimed).

Accounting (dpsynth.incontext.run, through the one private-run path): every example is charged ``max_new_tokens`` token steps before its first token is computed,
whatever its length. An example that ends early (EOS or newline) is the post-processing (truncation) of
the fixed-length mechanism, so the number of charged mechanisms never depends on the data; a
data-dependent stop would need a privacy filter. The run's plan (num_examples x max_new_tokens steps, plus
the DP label histogram if any) is admitted by the ledger first; when the ledger refuses a charge,
generation stops and what was completed is kept. The certificate's epsilon comes from the charges.
"""

from .run import generate, incontext_hash

__all__ = ["generate", "incontext_hash"]
