package dev.flowgate.engine;

import java.util.concurrent.TimeUnit;
import java.util.concurrent.locks.ReentrantLock;
import org.camunda.bpm.engine.rest.impl.FetchAndLockHandlerImpl;
import org.camunda.bpm.engine.rest.impl.FetchAndLockRequest;
import org.camunda.bpm.engine.rest.impl.FetchAndLockResult;

/**
 * The REST API's long-poll handler ({@code POST /external-task/fetchAndLock}), with the
 * engine's fetches taken one at a time.
 *
 * <p>The engine's own handler serves the polls that wait on one thread, but tries a newly
 * arrived poll at once on that request's thread. With two or more workers the two attempts
 * run together, read the same available tasks and both try to lock them: one update loses
 * its optimistic lock, dropped silently, and the engine has run a whole fetch (the query,
 * the variables, the failed update) for nothing. With two flowgate workers on one engine,
 * two tasks of three were locked twice (bench/ANALYSIS.md). Taken one at a time, in the
 * order they come, each attempt sees what the one before it locked. Engines of a cluster
 * still race each other, as they do without it.
 *
 * <p>The REST API finds its handler with a service loader; the build writes the services
 * file for either engine, and a Spring Boot jar puts the application's classes before its
 * libraries, so this one is found before the engine's own.
 */
public class SerialFetchAndLockHandler extends FetchAndLockHandlerImpl {
  /**
   * How long an attempt waits for the one before it. Fetches take milliseconds; one that
   * waits for a database connection (an outage) takes up to the pool's timeout, and the
   * attempts behind it then go on together rather than queue past their clients' timeouts:
   * a race costs the engine wasted work, never a task.
   */
  private static final long WAIT_MS = 2_000;

  private final ReentrantLock oneAtATime = new ReentrantLock(true);

  @Override
  protected FetchAndLockResult tryFetchAndLock(FetchAndLockRequest request) {
    boolean alone = false;
    try {
      alone = oneAtATime.tryLock(WAIT_MS, TimeUnit.MILLISECONDS);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
    try {
      return super.tryFetchAndLock(request);
    } finally {
      if (alone) {
        oneAtATime.unlock();
      }
    }
  }
}
