#pragma once
// A planted layering violation for the layering_check_catches test: core
// must not include a header of the moe layer.
#include <moka/core/Error.hpp>
#include <moka/moe/MoELayer.hpp>
