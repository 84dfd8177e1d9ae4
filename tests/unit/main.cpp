// The doctest runner for every unit test file under tests/unit/.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "core/tsan_suppressions.hpp"
