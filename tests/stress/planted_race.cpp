// Planted bug for the TSan leg of scripts/sanitizers.sh: two std::threads increment a plain (non-atomic)
// counter without a lock. The leg fails unless ThreadSanitizer reports "data race" and the program exits
// non-zero. The CPU backend uses std::thread only (no OpenMP), so TSan sees all of its synchronisation.
#include <cstdio>
#include <thread>

namespace {
long counter = 0;  // shared, unprotected
void bump() {
  for (int i = 0; i < 100000; ++i) counter = counter + 1;
}
}  // namespace

int main() {
  std::thread a(bump), b(bump);
  a.join();
  b.join();
  std::printf("planted_race counter %ld: the sanitizer did not catch it\n", counter);
  return 0;
}
