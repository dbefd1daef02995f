// Planted bug for the UBSan half of the asan+ubsan leg of scripts/sanitizers.sh: a signed integer overflow.
// The leg fails unless UndefinedBehaviorSanitizer reports it ("runtime error: signed integer overflow") and
// the program exits non-zero (-fno-sanitize-recover=all).
#include <climits>
#include <cstdio>

int main(int argc, char** argv) {
  (void)argv;
  volatile int big = INT_MAX - 1 + argc;  // INT_MAX, hidden from the optimizer
  const int x = big + 1;                  // signed overflow: undefined behaviour
  std::printf("planted_ub computed %d: the sanitizer did not catch it\n", x);
  return 0;
}
