"""The contract: labels, preprocessing, ensemble math, profiles, results, prompts, and reading
a built repository's manifest and configs. numpy, Pillow and PyYAML only: the Triton stubs
import it, and so does every layer above."""
