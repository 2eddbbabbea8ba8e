export * from '../../src/bench/heartbeat.js';
