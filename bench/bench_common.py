"""What the side-by-side benchmark references share: peftkit's RNG and epoch order (so the
Python side reads rows in the order our trainers do) and the LLaMA-Factory → TRL record
conversion. Imported by rm_reference.py, dpo_reference.py and ppo_reference.py."""

M64 = (1 << 64) - 1


class Rng:
    """peftkit's Rng (splitmix64-seeded xoshiro256**): same seed, same shuffle."""

    def __init__(self, seed):
        x, s = seed & M64, []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & M64
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            s.append(z ^ (z >> 31))
        self.s = s

    def next_u64(self):
        s = self.s
        rotl = lambda v, k: ((v << k) | (v >> (64 - k))) & M64
        result = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result

    def shuffle(self, v):
        for i in range(len(v) - 1, 0, -1):
            j = (self.next_u64() * (i + 1)) >> 64
            v[i], v[j] = v[j], v[i]


def epoch_order(n, seed, epoch):
    order = list(range(n))
    Rng(seed ^ ((epoch * 0x9E3779B97F4A7C15) & M64) ^ 0xDA7A).shuffle(order)
    return order


ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def messages(lst):
    return [{"role": ROLES[m["from"]], "content": m["value"]} for m in lst]


def conversational(rec):
    """LLaMA-Factory record -> TRL's conversational preference record (explicit prompt)."""
    return {"prompt": messages(rec["conversations"]), "chosen": messages([rec["chosen"]]),
            "rejected": messages([rec["rejected"]])}
