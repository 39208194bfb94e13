// A planted violation: comm and io are side by side, neither includes the other.
#include <moka/io/RoutingTrace.hpp>
