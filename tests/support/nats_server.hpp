// Defines pop::test::nats_server: a real nats-server with JetStream on 127.0.0.1, started on a free
// port with its store in a temporary directory, and stopped by PID.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>

namespace pop::test {

// Owns one nats-server process. restart() keeps the port and the store, so streams and their
// messages survive it as they would a real broker restart. Not thread-safe.
class nats_server {
 public:
  nats_server() : port_(free_port()) {
    std::random_device rd;
    store_ = std::filesystem::temp_directory_path() /
             ("pop-nats-" + std::to_string(rd()) + "-" + std::to_string(rd()));
    std::filesystem::create_directories(store_);
    start();
  }
  ~nats_server() {
    stop();
    std::error_code ec;
    std::filesystem::remove_all(store_, ec);
  }
  nats_server(const nats_server&) = delete;
  nats_server& operator=(const nats_server&) = delete;

  std::string url() const { return "nats://127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }
  pid_t pid() const { return pid_; }

  // Starts the server (if stopped) and waits until it accepts connections.
  void start() {
    if (pid_ > 0) return;
    const std::string port = std::to_string(port_);
    const std::string store = store_.string();
    std::error_code ec;
    std::filesystem::remove(store_ / "server.log", ec);  // readiness is read from a fresh log
    // Quiet unless asked: its log goes to the store directory. (Built before the fork: the child
    // of a threaded process must not allocate.)
    const std::string log = store + "/server.log";
    pid_ = fork();
    if (pid_ < 0) throw std::runtime_error("nats_server: fork failed");
    if (pid_ == 0) {
      // It dies with the test (even one that crashed), and holds none of the test's pipes, so
      // CTest never waits on an orphaned server.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      const int null_fd = open("/dev/null", O_RDWR);
      if (null_fd >= 0) {
        dup2(null_fd, 0);
        dup2(null_fd, 1);
        dup2(null_fd, 2);
      }
      execlp("nats-server", "nats-server", "-js", "-a", "127.0.0.1", "-p", port.c_str(), "-sd",
             store.c_str(), "-l", log.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    // Ready means JetStream too: the log says so once it is enabled and the client port is open.
    while (!accepts() || !logged("Server is ready")) {
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("nats_server: nats-server exited at start (is it installed?)");
      }
      if (std::chrono::steady_clock::now() > deadline) {
        stop();
        throw std::runtime_error("nats_server: nats-server did not accept connections in 20 s");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  // Stops it with SIGTERM (SIGKILL if `hard`, or if it has not exited 10 s after SIGTERM) and
  // waits for it to exit.
  void stop(bool hard = false) {
    if (pid_ <= 0) return;
    // A pidfd becomes readable when the process exits: waited on with a bound, not polled.
    const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
    kill(pid_, hard ? SIGKILL : SIGTERM);
    pollfd exited{.fd = pidfd, .events = POLLIN, .revents = 0};
    if (pidfd < 0 || poll(&exited, 1, 10'000) == 0) {
      std::fprintf(stderr,
                   "nats_server: nats-server not known to have exited 10 s after SIGTERM: "
                   "killed\n");
      kill(pid_, SIGKILL);  // cannot be ignored: the wait below is bounded
    }
    if (pidfd >= 0) close(pidfd);
    int st = 0;
    waitpid(pid_, &st, 0);
    pid_ = -1;
  }
  void restart() {
    stop();
    start();
  }

 private:
  static int free_port() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      if (fd >= 0) close(fd);
      throw std::runtime_error("nats_server: no free port");
    }
    close(fd);
    return ntohs(a.sin_port);
  }
  bool logged(const std::string& line) const {
    std::ifstream in(store_ / "server.log");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return text.find(line) != std::string::npos;
  }
  bool accepts() const {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(port_));
    const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    close(fd);
    return ok;
  }

  int port_;
  std::filesystem::path store_;
  pid_t pid_ = -1;
};

}  // namespace pop::test
