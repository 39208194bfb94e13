// moka-inspect: what a MoKA checkpoint holds (format, version, build, the
// writer's layout, step, placement, every dataset with its shape, type and
// checksum verified); exit status 0 for a sound file, 1 for a damaged one,
// 2 for one that cannot be read or bad arguments.
#include <moka/checkpoint/CheckpointConfig.hpp>
#include <moka/core/Error.hpp>

#include <iostream>
#include <string>

int main(int argc, char* argv[]) {
  const char* usage =
      "usage: moka-inspect <checkpoint.h5> [--deck]\n"
      "Prints what a MoKA checkpoint holds and verifies every dataset's checksum;\n"
      "--deck also prints the resolved input deck stored with it.\n"
      "Exit status: 0 sound, 1 damaged (a checksum fails), 2 unreadable or bad arguments.\n";
  std::string path;
  bool deck = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << usage;
      return 0;
    }
    if (a == "--deck") deck = true;
    else if (path.empty()) path = a;
    else {
      std::cerr << usage;
      return 2;
    }
  }
  if (path.empty()) {
    std::cerr << usage;
    return 2;
  }
  try {
    moka::CheckpointReader probe(path);  // unreadable: exit 2
  } catch (const std::exception& e) {
    std::cerr << "moka-inspect: error: " << e.what() << std::endl;
    return 2;
  }
  try {
    moka::describe_checkpoint(path, std::cout, deck);
  } catch (const std::exception& e) {
    std::cout << std::flush;
    std::cerr << "moka-inspect: error: " << e.what() << std::endl;
    return 1;
  }
  std::cout << "every checksum verified" << std::endl;
  return 0;
}
