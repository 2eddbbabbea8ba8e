// CRIU's zdtm tests moved by the modes that copy memory before the resume.
import { zdtmSuite } from '../support/zdtm.js';

zdtmSuite(['stop-copy', 'pre-copy'], 'z', 85);
