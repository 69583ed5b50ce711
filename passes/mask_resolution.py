"""Split the causal structure out of the masks a score walk collected.

A mask that is (or contains) the causal triangle becomes the op's ``is_causal``; what remains
stays a boolean keep-mask or an additive term. Mixed into the discovery matcher, whose
``evaluator``, ``user_inputs``, ``activation`` and ``scalar_value`` it uses.
"""

from __future__ import annotations

from compiler.ir.masks import additive_keep, constant_additive_pattern, split_causal, split_causal_masked


class MaskResolver:
    # -- masks ------------------------------------------------------------------------

    def resolve_masks(self, terms, keeps, sq, sk, notes, full_rows=None):
        """Split causal structure out of the masks. Returns (causal, terms, keeps, kind).

        A causal part found in a mask with a finite fill (``finfo.min``) only becomes
        ``is_causal`` when the model's rows stay the same: a row whose every key is filled
        attends uniformly over ALL keys in the model, causal ones included. That is kept exactly
        when this mask is the site's only mask (``full_rows`` receives its other conjuncts, for
        the rewrite to restore such rows); otherwise the causal part stays in the mask.
        """
        first = self._resolve_masks(terms, keeps, sq, sk, split_finite=True)
        causal, out_terms, out_keeps, n, finite = first
        if finite:
            # Input-dependent additive terms may be masks too; constant ones (ALiBi) are biases.
            masks = sum(isinstance(t[0], tuple) or self.activation(t[0]) for t in out_terms)
            others = bool(out_keeps) or masks > sum(produced for _, produced in finite)
            with_rest = [rest for rest, _ in finite if rest]
            if not others and len(with_rest) <= 1 and (not with_rest or sq <= sk):
                if with_rest and full_rows is not None:
                    full_rows.extend(with_rest[0])
            else:
                causal, out_terms, out_keeps, n, _ = self._resolve_masks(terms, keeps, sq, sk, split_finite=False)
                notes.append("causal part kept in the mask: a row whose keys are all filled with a finite value "
                             "attends uniformly over every key, as the model does")
        notes.extend(n)
        kinds = []
        if out_keeps:
            kinds.append("bool")
        if out_terms:
            kinds.append("additive")
        return causal, out_terms, out_keeps, "+".join(kinds) or "none"

    def _resolve_masks(self, terms, keeps, sq, sk, split_finite: bool):
        """(causal, terms, keeps, notes, finite): ``finite`` lists, for each causal part split
        from a finite-fill mask, the (cond, negate) conjuncts that stayed with it."""
        causal = False
        notes: list[str] = []
        finite: list[list] = []
        out_terms, out_keeps = [], []
        for cond, negate in keeps:
            if negate:
                split, masked = split_causal_masked(cond, self.evaluator, self.user_inputs, sq, sk)
                out_keeps.extend((m, True) for m in masked)
            else:
                split = split_causal(cond, self.evaluator, self.user_inputs, sq, sk)
            notes.extend(split.notes)
            causal |= split.causal
            out_keeps.extend((r, False) for r in split.residual)
        for node, coef, tfs in terms:
            if isinstance(node, tuple):  # ("where", cond, negate, fill) from a masked score
                _, cond, negate, fill = node
                if not split_finite:
                    out_terms.append((node, coef, tfs))
                    continue
                rest = []
                if negate:
                    split, masked = split_causal_masked(cond, self.evaluator, self.user_inputs, sq, sk)
                    rest = [(m, True) for m in masked]
                    for m in masked:
                        out_terms.append((("where", m, True, fill), coef, tfs))
                else:
                    split = split_causal(cond, self.evaluator, self.user_inputs, sq, sk)
                notes.extend(split.notes)
                causal |= split.causal
                rest += [(r, False) for r in split.residual]
                if split.causal:
                    finite.append((rest, len(rest) - len(split.residual) + bool(split.residual)))
                if split.residual:
                    out_terms.append((("where-all", split.residual, fill), coef, tfs))
                continue
            ak = additive_keep(node, self.scalar_value)
            if ak is not None and coef > 0:
                cond, fill = ak
                if not split_finite:
                    out_terms.append((("where-all", [cond], fill), coef, tfs))
                    continue
                split = split_causal(cond, self.evaluator, self.user_inputs, sq, sk)
                notes.extend(split.notes)
                causal |= split.causal
                if split.causal and fill != float("-inf"):
                    finite.append(([(r, False) for r in split.residual], bool(split.residual)))
                if split.residual:
                    out_terms.append((("where-all", split.residual, fill), coef, tfs))
                continue
            pat = constant_additive_pattern(node, self.evaluator, self.user_inputs, sq, sk)
            if pat == "causal" and split_finite:
                causal = True
                if not bool((self.evaluator(node) == float("-inf")).any()):
                    finite.append(([], 0))
                continue
            if pat == "all":
                continue
            out_terms.append((node, coef, tfs))
        return causal, out_terms, out_keeps, notes, finite
